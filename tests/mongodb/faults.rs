//! Faults on the real servers (DESIGN §7.4): kill -9 and restart under live
//! subscribers and a publisher, a server stopped while a service publishes, a tiny oplog
//! that loses a subscriber's history while it is away, fail points on the commands the
//! medium sends. Each test starts a server of its own, since it kills it or arms fail
//! points that would hit every client of a shared one.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use intracom::bson::{doc, Document, Timestamp};
use intracom::{Error, Intracom, Message, PublishStatus, Subscription, WorkOptions};

use crate::conformance::HANG_GUARD;
use crate::servers::{Options, Server, Target};
use crate::{catalog, check, database_name, eventually, on_server, raw_client, Check};

pub fn checks() -> Vec<Check> {
    vec![
        check!(
            a_server_killed_under_live_subscribers_loses_nothing_it_kept,
            owns_server
        ),
        check!(
            publishes_while_the_server_is_stopped_arrive_in_order,
            owns_server
        ),
        check!(
            a_subscriber_away_past_a_tiny_oplog_catches_up_without_gap,
            owns_server
        ),
        check!(
            capped_a_subscriber_away_past_a_tiny_oplog_catches_up_without_gap,
            owns_server
        ),
        check!(fail_points_lose_and_double_nothing, owns_server),
        check!(
            a_named_subscriber_restarted_just_before_a_server_pause_delivers_nothing_it_acked,
            owns_server
        ),
    ]
}

/// A server of this test's own, and a URI that gives up on it quickly while it is down
/// (so publishes go to the outbox instead of waiting 30 s for a server).
fn own_server(t: &Target, options: Options) -> (Server, String) {
    let kind = t
        .kind()
        .expect("fault tests run on servers the harness starts");
    let server = Server::start(kind, options).unwrap_or_else(|e| panic!("{kind}: {e}"));
    let uri = format!(
        "{}&serverSelectionTimeoutMS=2000&connectTimeoutMS=1000",
        server.uri()
    );
    (server, uri)
}

async fn bus(uri: &str, database: &str, instance: &str) -> Intracom {
    Intracom::connect(on_server(catalog("billing", instance), uri, database))
        .await
        .unwrap_or_else(|e| panic!("bus on {uri}: {e}"))
}

/// What a named subscriber saw.
#[derive(Default)]
struct Seen {
    /// Ids in delivery order (repeats included).
    order: Vec<String>,
    acked: HashSet<String>,
    /// Ids delivered again after they were acked.
    again_after_ack: Vec<String>,
    /// Lost reports (count each).
    lost: Vec<u64>,
    /// Errors that ended the stream.
    ended: Option<String>,
}

/// Subscribes (anchored when this returns), then consumes the named subscription in a
/// task, acking each delivery.
async fn collect(bus: &Intracom, name: &'static str) -> Arc<Mutex<Seen>> {
    collecting(bus, name).await.0
}

/// [`collect`], with the consuming task (aborting it is a consumer killed mid-stream).
async fn collecting(
    bus: &Intracom,
    name: &'static str,
) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let out = Arc::clone(&seen);
    let mut sub = bus
        .subscribe(Subscription::named(name))
        .await
        .unwrap_or_else(|e| panic!("subscribe: {e}"));
    let task = tokio::spawn(async move {
        while let Some(item) = sub.next().await {
            match item {
                Ok(delivery) => {
                    let id = delivery.id.clone();
                    {
                        let mut seen = out.lock().unwrap();
                        if seen.acked.contains(&id) {
                            seen.again_after_ack.push(id.clone());
                        }
                        seen.order.push(id.clone());
                    }
                    // An ack that fails while the server is down leaves the checkpoint
                    // behind: the message may come again, which is allowed before an ack.
                    if delivery.ack().await.is_ok() {
                        out.lock().unwrap().acked.insert(id);
                    }
                }
                Err(Error::Lost { count, .. }) => out.lock().unwrap().lost.push(count),
                Err(e) if e.is_report() => {}
                Err(e) => {
                    out.lock().unwrap().ended = Some(e.to_string());
                    return;
                }
            }
        }
    });
    (seen, task)
}

/// The ids the server holds in the messages collection, in `ts` order.
async fn stored_ids(uri: &str, database: &str) -> Vec<String> {
    let messages = raw_client(uri)
        .await
        .database(database)
        .collection::<Document>("messages");
    let mut cursor = messages
        .find(doc! {})
        .sort(doc! { "ts": 1 })
        .projection(doc! { "_id": 1 })
        .await
        .expect("find");
    let mut ids = Vec::new();
    while let Some(d) = cursor.next().await {
        ids.push(d.expect("document").get_str("_id").expect("id").to_string());
    }
    ids
}

/// Waits until the subscriber has seen every id of `wanted` (bounded).
async fn wait_seen(seen: &Arc<Mutex<Seen>>, wanted: &[String]) {
    let deadline = tokio::time::Instant::now() + HANG_GUARD * 2;
    loop {
        let missing: Vec<String> = {
            let seen = seen.lock().unwrap();
            if let Some(e) = &seen.ended {
                panic!("the subscription ended: {e}");
            }
            let got: HashSet<&String> = seen.order.iter().collect();
            wanted
                .iter()
                .filter(|id| !got.contains(id))
                .cloned()
                .collect()
        };
        if missing.is_empty() {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            let seen = seen.lock().unwrap();
            panic!(
                "the subscriber did not receive {} of {} messages within the hang guard (first missing: {:?}; wanted: {:?}; delivered: {:?}; lost reports: {:?})",
                missing.len(),
                wanted.len(),
                missing.first(),
                wanted,
                seen.order,
                seen.lost
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The first delivery of each id, in order.
fn first_deliveries(seen: &Seen) -> Vec<String> {
    let mut firsts = HashSet::new();
    seen.order
        .iter()
        .filter(|id| firsts.insert((*id).clone()))
        .cloned()
        .collect()
}

async fn publish_n(bus: &Intracom, n: usize) -> Vec<(String, PublishStatus)> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let published = bus
            .publish(Message::broadcast("reload"))
            .await
            .expect("publish stores or buffers");
        out.push((published.id, published.status));
    }
    out
}

async fn outbox_drained(bus: &Intracom) {
    eventually("the outbox is sent", HANG_GUARD, || async {
        bus.outbox_len() == 0
    })
    .await;
}

/// kill -9 of the server with a named subscriber and a publisher at work, then a
/// restart: every message the server still has is delivered, in order; nothing is
/// delivered again after its ack; what the outbox held while the server was down
/// arrives after it.
async fn a_server_killed_under_live_subscribers_loses_nothing_it_kept(t: &Target) {
    let (mut server, uri) = own_server(t, Options::default());
    let database = database_name();
    let publisher = bus(&uri, &database, "billing-1").await;
    let consumer = bus(&uri, &database, "billing-2").await;
    let seen = collect(&consumer, "ledger").await;
    // The subscription is anchored once a first message comes through.
    let first = publish_n(&publisher, 1).await;
    wait_seen(&seen, &[first[0].0.clone()]).await;

    let before = publish_n(&publisher, 40).await;
    server.kill9();
    let during = publish_n(&publisher, 20).await;
    assert!(
        during
            .iter()
            .all(|(_, status)| *status == PublishStatus::Buffered),
        "publishes while the server is dead wait in the outbox"
    );
    server
        .restart()
        .unwrap_or_else(|e| panic!("{t} restart: {e}"));
    let after = publish_n(&publisher, 20).await;
    outbox_drained(&publisher).await;

    let kept = stored_ids(&uri, &database).await;
    let sent: Vec<String> = first
        .iter()
        .chain(&before)
        .chain(&during)
        .chain(&after)
        .map(|(id, _)| id.clone())
        .collect();
    // Everything published after the restart, or buffered during the outage, is on
    // the server: the outbox lost nothing.
    for id in during.iter().chain(&after).map(|(id, _)| id) {
        assert!(kept.contains(id), "{id} was published but is not stored");
    }
    wait_seen(&seen, &kept).await;
    {
        let seen = seen.lock().unwrap();
        assert!(
            seen.again_after_ack.is_empty(),
            "delivered again after its ack: {:?}",
            seen.again_after_ack
        );
        let delivered: Vec<String> = first_deliveries(&seen)
            .into_iter()
            .filter(|id| kept.contains(id))
            .collect();
        assert_eq!(delivered, kept, "every kept message, in the server's order");
        let sent_order: Vec<&String> = sent.iter().filter(|id| kept.contains(id)).collect();
        assert_eq!(
            sent_order,
            kept.iter().collect::<Vec<_>>(),
            "the publisher's order is the server's"
        );
    }
    publisher.shutdown().await;
    consumer.shutdown().await;
}

/// A server stopped (SIGTERM) while a service publishes: the publishes wait in the
/// outbox, then reach the subscriber in publish order when the server is back.
async fn publishes_while_the_server_is_stopped_arrive_in_order(t: &Target) {
    let (mut server, uri) = own_server(t, Options::default());
    let database = database_name();
    let publisher = bus(&uri, &database, "billing-1").await;
    let consumer = bus(&uri, &database, "billing-2").await;
    let seen = collect(&consumer, "ledger").await;
    let first = publish_n(&publisher, 1).await;
    wait_seen(&seen, &[first[0].0.clone()]).await;

    server.stop();
    let during = publish_n(&publisher, 25).await;
    assert!(
        during
            .iter()
            .all(|(_, status)| *status == PublishStatus::Buffered),
        "buffered while the server is stopped"
    );
    assert_eq!(publisher.outbox_len(), 25);
    server
        .restart()
        .unwrap_or_else(|e| panic!("{t} restart: {e}"));
    outbox_drained(&publisher).await;
    let ids: Vec<String> = during.into_iter().map(|(id, _)| id).collect();
    wait_seen(&seen, &ids).await;
    {
        let seen = seen.lock().unwrap();
        let delivered: Vec<String> = first_deliveries(&seen)
            .into_iter()
            .filter(|id| ids.contains(id))
            .collect();
        assert_eq!(delivered, ids, "in publish order, each once");
    }
    publisher.shutdown().await;
    consumer.shutdown().await;
}

/// A named subscription away while so much is published that the oplog (100 entries)
/// no longer holds its resume point: it catches up from the collection, with no gap
/// and no duplicate.
async fn a_subscriber_away_past_a_tiny_oplog_catches_up_without_gap(t: &Target) {
    away_past_a_tiny_oplog(t, false).await;
}

/// The same on a capped messages collection (`common.intracom.db.retention=capped`).
async fn capped_a_subscriber_away_past_a_tiny_oplog_catches_up_without_gap(t: &Target) {
    away_past_a_tiny_oplog(t, true).await;
}

async fn away_past_a_tiny_oplog(t: &Target, capped: bool) {
    let (server, uri) = own_server(
        t,
        Options {
            oplog_max_entries: Some(100),
        },
    );
    let database = database_name();
    let bus = |uri: &str, database: &str, instance: &str| {
        let config = if capped {
            crate::capped(catalog("billing", instance), uri, database)
        } else {
            on_server(catalog("billing", instance), uri, database)
        };
        async move {
            Intracom::connect(config)
                .await
                .unwrap_or_else(|e| panic!("bus: {e}"))
        }
    };
    let publisher = bus(&uri, &database, "billing-1").await;
    let away = bus(&uri, &database, "billing-2").await;
    let mut sub = away.subscribe(Subscription::named("ledger")).await.unwrap();
    publish_n(&publisher, 1).await;
    let d = tokio::time::timeout(HANG_GUARD, sub.next())
        .await
        .expect("a delivery")
        .expect("stream open")
        .expect("a message");
    d.ack().await.unwrap();
    away.shutdown().await;
    drop(sub);

    // Enough traffic to prune for real (the Python server prunes every 1000 writes).
    let mut ids = Vec::new();
    for _ in 0..12 {
        let batch: Vec<Message> = (0..100).map(|_| Message::broadcast("reload")).collect();
        for p in publisher.publish_all(batch).await.unwrap() {
            ids.push(p.id);
        }
    }
    let client = raw_client(&uri).await;
    let checkpoint = client
        .database(&database)
        .collection::<Document>("checkpoints")
        .find_one(doc! { "_id": "ledger" })
        .await
        .unwrap()
        .expect("the checkpoint");
    let saved: Timestamp = checkpoint
        .get_document("position")
        .and_then(|p| p.get_document("token"))
        .and_then(|t| t.get_timestamp("ct"))
        .expect("a change-stream position");
    let oplog = client.database("local").collection::<Document>("oplog.rs");
    eventually(
        "the oplog is pruned past the saved position",
        HANG_GUARD,
        || async {
            let oldest = oplog
                .find_one(doc! {})
                .sort(doc! { "$natural": 1 })
                .await
                .unwrap()
                .and_then(|e| e.get_timestamp("ts").ok());
            oldest.is_some_and(|o| o > saved)
        },
    )
    .await;

    let back = bus(&uri, &database, "billing-3").await;
    let seen = collect(&back, "ledger").await;
    wait_seen(&seen, &ids).await;
    let seen = seen.lock().unwrap();
    assert_eq!(seen.order, ids, "all 1200, in order, each once");
    assert!(seen.lost.is_empty(), "nothing expired, nothing lost");
    drop(server);
}

/// Arms `failCommand` once for `command`: with a closed connection, or with a
/// retryable error code (91 ShutdownInProgress, labelled as MongoDB labels it).
/// Arms a fail point for the next `command` of the client named `app` (the `appName`
/// of its URI): no other client of the test can use it up.
async fn arm(client: &mongodb::Client, command: &str, close: bool, app: &str) {
    let mut data = doc! { "failCommands": [command], "appName": app };
    if close {
        data.insert("closeConnection", true);
    } else {
        data.insert("errorCode", 91);
        let label = if command == "getMore" {
            "ResumableChangeStreamError"
        } else {
            "RetryableWriteError"
        };
        data.insert("errorLabels", vec![label]);
    }
    client
        .database("admin")
        .run_command(
            doc! { "configureFailPoint": "failCommand", "mode": { "times": 1 }, "data": data },
        )
        .await
        .expect("configureFailPoint (--enable-test-commands)");
}

/// The `appName`s of the fail-point test's buses.
const PUBLISHER: &str = "intracom-test-publisher";
const CONSUMER: &str = "intracom-test-consumer";

/// Fail points on `update` (publish, and the idempotency reservation),
/// `findAndModify` (claim) and `getMore` (the change stream), each with a closed
/// connection and with a retryable error: writes are retried or buffered, streams
/// resume, nothing is lost or doubled.
async fn fail_points_lose_and_double_nothing(t: &Target) {
    let (server, uri) = own_server(t, Options::default());
    let database = database_name();
    // Each bus names itself to the server, and each fail point names the one it is for.
    let with_app = |app: &str| {
        let separator = if uri.contains('?') { '&' } else { '?' };
        format!("{uri}{separator}appName={app}")
    };
    let publisher = bus(&with_app(PUBLISHER), &database, "billing-1").await;
    let consumer = bus(&with_app(CONSUMER), &database, "billing-2").await;
    let admin = raw_client(&server.uri()).await;
    let seen = collect(&consumer, "ledger").await;
    let first = publish_n(&publisher, 1).await;
    wait_seen(&seen, &[first[0].0.clone()]).await;

    // A worker that counts how often each job runs.
    let runs: Arc<Mutex<Vec<String>>> = Arc::default();
    let worker_runs = Arc::clone(&runs);
    let _worker = consumer
        .work(
            "billing",
            &["invoice.render"],
            WorkOptions::default()
                .lease(Duration::from_secs(5))
                .poll(Duration::from_millis(100)),
            move |job: Message| {
                let runs = Arc::clone(&worker_runs);
                async move {
                    runs.lock().unwrap().push(job.id.clone());
                    Ok::<(), String>(())
                }
            },
        )
        .unwrap();

    let mut published = first.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
    let mut jobs = Vec::new();
    for close in [true, false] {
        // update: the publish command.
        arm(&admin, "update", close, PUBLISHER).await;
        published.extend(publish_n(&publisher, 3).await.into_iter().map(|(id, _)| id));
        // getMore: the shared change stream.
        arm(&admin, "getMore", close, CONSUMER).await;
        published.extend(publish_n(&publisher, 3).await.into_iter().map(|(id, _)| id));
        // findAndModify: a worker's claim.
        arm(&admin, "findAndModify", close, CONSUMER).await;
        let job = publisher
            .publish(Message::to_service("billing", "invoice.render").work())
            .await
            .unwrap();
        jobs.push(job.id);
        // update: an idempotency reservation (an upsert), once the outbox has sent
        // what the failed publish left there (its next update is the reservation).
        outbox_drained(&publisher).await;
        arm(&admin, "update", close, PUBLISHER).await;
        let key = format!("effect-{close}");
        let ran = publisher
            .idempotent("ledger")
            .run_once(&key, || async { Ok::<_, Error>(1) })
            .await;
        assert!(
            matches!(ran, Ok(intracom::Once::Ran(1))),
            "the reservation is retried: {ran:?}"
        );
        let again = publisher
            .idempotent("ledger")
            .run_once(&key, || async { Ok::<_, Error>(2) })
            .await
            .unwrap();
        assert!(
            matches!(again, intracom::Once::AlreadyDone(_)),
            "and not run twice: {again:?}"
        );
    }
    outbox_drained(&publisher).await;
    wait_seen(&seen, &published).await;
    eventually("every job runs", HANG_GUARD, || async {
        let runs = runs.lock().unwrap();
        jobs.iter().all(|j| runs.contains(j))
    })
    .await;
    // Give a duplicate the chance to show: one more message through the same path.
    let marker = publish_n(&publisher, 1).await.remove(0).0;
    wait_seen(&seen, std::slice::from_ref(&marker)).await;
    published.push(marker);

    {
        let seen = seen.lock().unwrap();
        assert_eq!(
            seen.order, published,
            "every message once, in publish order"
        );
        let runs = runs.lock().unwrap();
        assert_eq!(*runs, jobs, "each job ran once");
    }
    publisher.shutdown().await;
    consumer.shutdown().await;
}

/// Sends `signal` to the server's process (SIGSTOP pauses it: connections stay open
/// and unanswered, as on a stalled host; SIGCONT resumes it).
fn signal(server: &Server, signal: i32) {
    let pid = server.pid().expect("the server runs");
    // SAFETY: kill(2) on a child process of this test; no memory is shared.
    let sent = unsafe { libc::kill(pid as i32, signal) };
    assert_eq!(sent, 0, "kill({pid}, {signal})");
}

/// A named subscriber killed after acking a burst, restarted from its checkpoint, and a
/// server paused for 3 s a second later (the catch-up by `ts` that follows reads a
/// safety window before the checkpoint again): nothing acked before the restart is
/// delivered again, and nothing is missed.
async fn a_named_subscriber_restarted_just_before_a_server_pause_delivers_nothing_it_acked(
    t: &Target,
) {
    let (server, uri) = own_server(t, Options::default());
    // Heartbeats every 500 ms: the pause is noticed while it lasts.
    let uri = format!("{uri}&heartbeatFrequencyMS=500");
    let database = database_name();
    let publisher = bus(&uri, &database, "billing-1").await;
    let consumer = bus(&uri, &database, "billing-2").await;
    let (seen, task) = collecting(&consumer, "ledger").await;
    let first = publish_n(&publisher, 1).await;
    wait_seen(&seen, &[first[0].0.clone()]).await;
    // A burst well within a safety window (5 s) of the checkpoint.
    let burst: Vec<String> = publish_n(&publisher, 30)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    wait_seen(&seen, &burst).await;
    eventually("the burst is acked", HANG_GUARD, || async {
        let seen = seen.lock().unwrap();
        burst.iter().all(|id| seen.acked.contains(id))
    })
    .await;
    let acked: HashSet<String> = seen.lock().unwrap().acked.clone();
    // Killed: the consumer task gone mid-stream, without a shutdown of its
    // subscription. (Its bus stays open, untouched, and is shut down at the end: a bus
    // dropped without a shutdown leaves the driver's tasks to the runtime's end.)
    task.abort();

    let restarted = bus(&uri, &database, "billing-2").await;
    let again = collect(&restarted, "ledger").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    signal(&server, libc::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(3)).await;
    signal(&server, libc::SIGCONT);
    let after: Vec<String> = publish_n(&publisher, 5)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    outbox_drained(&publisher).await;
    wait_seen(&again, &after).await;
    {
        let again = again.lock().unwrap();
        let redelivered: Vec<&String> = again
            .order
            .iter()
            .filter(|id| acked.contains(*id))
            .collect();
        assert!(
            redelivered.is_empty(),
            "delivered again after the restart, though acked before it: {redelivered:?} (all deliveries: {:?})",
            again.order
        );
        assert_eq!(again.order, after, "the new messages, in order, each once");
    }
    publisher.shutdown().await;
    restarted.shutdown().await;
    consumer.shutdown().await;
    drop(server);
}
