//! The HTTP medium (`common.intracom.medium=http`): buses whose medium is a gateway of
//! this binary, over the gateway's `/medium/...` routes.
//!
//! - `http-memory::<case>`, `http-rs::<case>`, `http-py::<case>`: the conformance suite,
//!   unchanged, against a bus on the HTTP medium talking to an in-process gateway whose
//!   own bus is on the memory medium, on SecantusDB's Rust server, on its Python server.
//!   A case needing a capability the gateway's medium lacks is ignored by capability,
//!   as on any medium.
//! - `rs::http_failover_*`: two gateways on one database; a service listing both keeps
//!   its named subscription and its publishes across the loss of each.
//! - `memory::http_from_now_*`, `rs::http_from_now_*`: a subscription from now whose
//!   stream breaks before its first message gets what was published while it was
//!   broken.
//! - `memory::http_service_token_*` (and `rs::` for ending work): what a service token
//!   may not do on the medium routes: act for another service, end another service's
//!   work or read its outcomes, keep dead letters of other services' messages.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use intracom::bson::{doc, Document};
use intracom::gateway::{Gateway, GatewayOptions};
use intracom::{Config, Intracom, MediumKind, Message, PublishStatus, Subscription};
use libtest_mimic::Trial;

use super::conformance::{self, Capability, Harness, World};
use super::servers::{Kind, Target};
use super::{block_on, config, event_keys, tokens, Gw, Medium, Place, BILLING, GUARD, OPS, USERS};

/// The trials of this file.
pub fn trials() -> Vec<Trial> {
    let mut trials = Vec::new();
    let mut places = vec![Place::Memory];
    places.extend(
        [Kind::SecantusRs, Kind::SecantusPy]
            .into_iter()
            .map(|kind| Place::Server(Target::Secantus(kind))),
    );
    for place in places {
        let unavailable = place.unavailable();
        let prefix = format!("http-{}", place.short());
        trials.extend(conformance::trials(
            &prefix,
            Arc::new(Http { place }),
            unavailable.as_deref(),
        ));
    }
    let rs = Place::Server(Target::Secantus(Kind::SecantusRs));
    let unavailable = rs.unavailable();
    let trial = Trial::test(
        "rs::http_failover_keeps_publishes_and_the_subscription",
        move || block_on(failover_keeps_publishes_and_the_subscription(rs)),
    );
    trials.push(match unavailable {
        Some(reason) => trial.with_ignored_flag(true).with_kind(reason),
        None => trial,
    });
    for place in [
        Place::Memory,
        Place::Server(Target::Secantus(Kind::SecantusRs)),
    ] {
        for named in [false, true] {
            let place = place.clone();
            let kind = if named { "named" } else { "unnamed" };
            let name = format!(
                "{}::http_from_now_keeps_what_a_broken_stream_missed_{kind}",
                place.short()
            );
            let unavailable = place.unavailable();
            let trial = Trial::test(name, move || {
                block_on(from_now_keeps_what_a_broken_stream_missed(place, named))
            });
            trials.push(match unavailable {
                Some(reason) => trial.with_ignored_flag(true).with_kind(reason),
                None => trial,
            });
        }
    }
    trials.push(Trial::test(
        "memory::http_service_token_acts_as_its_service_only",
        || block_on(service_token_acts_as_its_service_only()),
    ));
    trials.push(Trial::test(
        "memory::http_service_token_ends_its_services_work_only",
        || block_on(service_token_ends_its_services_work_only(Place::Memory)),
    ));
    // On MongoDB: the owner-less settle's check reads the message from the database.
    let rs = Place::Server(Target::Secantus(Kind::SecantusRs));
    let unavailable = rs.unavailable();
    let trial = Trial::test(
        "rs::http_service_token_ends_its_services_work_only",
        move || block_on(service_token_ends_its_services_work_only(rs)),
    );
    trials.push(match unavailable {
        Some(reason) => trial.with_ignored_flag(true).with_kind(reason),
        None => trial,
    });
    trials.push(Trial::test(
        "memory::http_service_token_keeps_its_services_dead_letters_only",
        || block_on(service_token_keeps_its_services_dead_letters_only()),
    ));
    trials
}

/// The conformance suite through a gateway on `place`.
struct Http {
    place: Place,
}

/// One gateway of one test (its own database or memory medium), and the mongodb
/// client that tells when a message expired on a server.
struct HttpWorld {
    gw: Gw,
    retention: Duration,
    client: Option<mongodb::Client>,
}

/// The configuration of a bus on the HTTP medium: `urls` (comma separated), `token`.
pub fn on_gateways(mut config: Config, urls: &str, token: &str) -> Config {
    config
        .set("common.intracom.http.url", urls)
        .expect("gateway URLs");
    config
        .set("common.intracom.http.token", token)
        .expect("a token");
    config.medium = MediumKind::Http;
    config
}

#[async_trait]
impl Harness for Http {
    async fn world(&self, retention_ms: u64) -> Box<dyn World> {
        let config = Config::builder()
            .service("gateway")
            .timeout_ms(retention_ms)
            .build()
            .expect("gateway config");
        let gw = Gw::with_config(&self.place, config, GatewayOptions::default()).await;
        let client = match &gw.medium {
            Medium::Server { uri, .. } => Some(
                mongodb::Client::with_uri_str(uri)
                    .await
                    .expect("a driver client"),
            ),
            _ => None,
        };
        Box::new(HttpWorld {
            gw,
            retention: Duration::from_millis(retention_ms),
            client,
        })
    }

    fn short_retention_ms(&self) -> u64 {
        match self.place {
            // As the memory medium's own suite.
            Place::Memory => 5_000,
            // As the MongoDB suite: the TTL index counts whole seconds.
            Place::Server(_) => 15_000,
        }
    }

    fn capabilities(&self) -> &'static [Capability] {
        // The HTTP medium promises what the gateway's medium promises: memory and
        // MongoDB promise everything (`HttpWorld::bus` checks every bus's declaration
        // against the gateway's medium's).
        Capability::ALL
    }

    fn excluded(&self, case: &str) -> Option<&'static str> {
        // The Python server's divergence the MongoDB suite shows
        // (`py::divergence::now_in_a_query_expr_is_misread`): a gateway on it inherits it.
        let py = matches!(
            self.place,
            Place::Server(Target::Secantus(Kind::SecantusPy))
        );
        let breaks = [
            "exactly_one_instance_answers_each_request",
            "a_lapsed_workers_late_outcome_leaves_its_neighbours_claim_alone",
        ];
        (py && breaks.contains(&case)).then_some(
            "py: $$NOW in a query $expr is misread (a lease that ends in the future looks ended), so two workers can hold one claim [mongod: $$NOW is the server's clock]",
        )
    }
}

#[async_trait]
impl World for HttpWorld {
    async fn bus(&self, config: Config) -> Intracom {
        // An admin token: the suite's buses act for several services (`as_service`).
        let bus = Intracom::connect(on_gateways(config, &self.gw.base, OPS))
            .await
            .expect("bus on the HTTP medium");
        assert_eq!(
            bus.medium().capabilities(),
            self.gw.bus.medium().capabilities(),
            "the HTTP medium declares its gateway's medium's capabilities"
        );
        bus
    }

    async fn wait_expired(&self, id: &str) {
        match (&self.client, &self.gw.medium) {
            (Some(client), Medium::Server { database, .. }) => {
                let messages = client.database(database).collection::<Document>("messages");
                let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
                while messages
                    .count_documents(doc! { "_id": id })
                    .await
                    .expect("count")
                    != 0
                {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "the TTL monitor did not delete {id} within the hang guard"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            _ => tokio::time::sleep(self.retention + Duration::from_millis(50)).await,
        }
    }
}

/// The server and database of a gateway's bus.
fn database_of(gw: &Gw) -> (String, String) {
    let Medium::Server { uri, database } = &gw.medium else {
        panic!("a second gateway needs a server's database");
    };
    (uri.clone(), database.clone())
}

/// A gateway over the database `(uri, database)`, serving on `listener`.
async fn gateway_on((uri, database): &(String, String), listener: std::net::TcpListener) -> Gw {
    let mut gateway_config = config("gateway");
    gateway_config.medium = MediumKind::Db;
    gateway_config.db.uri = uri.clone();
    gateway_config.db.database = database.clone();
    let bus = Intracom::connect(gateway_config)
        .await
        .expect("a second gateway's bus");
    let gateway = Gateway::new(bus.clone(), tokens())
        .options(GatewayOptions::default().event_keys(event_keys()));
    Gw::serve_on(
        gateway,
        bus,
        Medium::Server {
            uri: uri.clone(),
            database: database.clone(),
        },
        listener,
    )
}

fn listener_at(address: &str) -> std::net::TcpListener {
    // The port was just released by the gateway stopped there; the listener sets
    // SO_REUSEADDR, so a connection of the old one in TIME_WAIT does not hold it.
    std::net::TcpListener::bind(address).unwrap_or_else(|e| panic!("binding {address}: {e}"))
}

/// Publishes `count` broadcasts; their ids, and whether each was buffered.
async fn publish(bus: &Intracom, count: usize) -> Vec<(String, PublishStatus)> {
    let mut ids = Vec::new();
    for _ in 0..count {
        let published = tokio::time::timeout(GUARD, bus.publish(Message::broadcast("reload")))
            .await
            .expect("publish: hang guard")
            .expect("published or buffered");
        ids.push((published.id, published.status));
    }
    ids
}

/// Two gateways on one database; a service on the HTTP medium that lists both (and
/// an outbox), with a named subscription that acks what it receives:
/// 1. through gateway 1: published and delivered;
/// 2. gateway 1 stops while billing publishes: publishes go to gateway 2 (one caught by
///    the stop through the outbox), the subscription resumes there;
/// 3. gateway 2 stops too: publishes wait in the outbox (buffered);
/// 4. a gateway answers again at gateway 1's address: the outbox is sent, the
///    subscription resumes.
///
/// The subscription receives every id once, in publish order: no gap, and nothing it
/// acked comes again.
async fn failover_keeps_publishes_and_the_subscription(place: Place) {
    let first = Gw::start(&place).await;
    let database = database_of(&first);
    let second = gateway_on(&database, listener_at("127.0.0.1:0")).await;
    let urls = format!("{},{}", first.base, second.base);
    let first_address = first.base.trim_start_matches("http://").to_string();

    let billing = Intracom::connect(on_gateways(config("billing"), &urls, BILLING))
        .await
        .expect("billing on the HTTP medium");
    let users = Intracom::connect(on_gateways(config("users"), &urls, USERS))
        .await
        .expect("users on the HTTP medium");
    let mut inbox = users
        .subscribe(Subscription::named("inbox").actions(["reload"]))
        .await
        .expect("a named subscription");

    let mut delivered = Vec::new();

    // 1. Gateway 1.
    let one = publish(&billing, 5).await;
    assert!(
        one.iter().all(|(_, s)| *s == PublishStatus::Stored),
        "{one:?}"
    );
    receive(&mut inbox, &mut delivered, 5).await;

    // 2. Gateway 1 goes away while billing publishes: gateway 2 takes the publishes (a
    // publish caught by the stop waits in the outbox and follows) and the subscription.
    let (started, mut five_out) = tokio::sync::mpsc::channel::<()>(1);
    let publisher = {
        let billing = billing.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..20 {
                ids.extend(publish(&billing, 1).await);
                if n == 4 {
                    let _ = started.send(()).await;
                }
            }
            ids
        })
    };
    five_out.recv().await.expect("five published");
    first.stop().await;
    let two = publisher.await.expect("the publisher");
    assert!(
        two.iter()
            .all(|(_, s)| matches!(s, PublishStatus::Stored | PublishStatus::Buffered)),
        "{two:?}"
    );
    let after_stop = publish(&billing, 5).await;
    assert!(
        after_stop
            .iter()
            .all(|(_, s)| *s != PublishStatus::Duplicate),
        "{after_stop:?}"
    );
    receive(&mut inbox, &mut delivered, 25).await;
    let two: Vec<_> = two.into_iter().chain(after_stop).collect();

    // 3. Gateway 2 goes away too: the publishes wait in the outbox.
    second.stop().await;
    let three = publish(&billing, 5).await;
    assert!(
        three.iter().all(|(_, s)| *s == PublishStatus::Buffered),
        "no gateway: buffered in the outbox: {three:?}"
    );

    // 4. A gateway at gateway 1's address again: the outbox goes out, and the
    // subscription resumes after the last position it read.
    let third = gateway_on(&database, listener_at(&first_address)).await;
    receive(&mut inbox, &mut delivered, 5).await;

    let published: Vec<String> = one
        .iter()
        .chain(&two)
        .chain(&three)
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(
        delivered, published,
        "every message once, in order: no gap, no redelivery"
    );
    // Nothing else is waiting: the next delivery is a marker published now.
    let marker = billing
        .publish(Message::broadcast("reload"))
        .await
        .expect("a marker");
    receive(&mut inbox, &mut delivered, 1).await;
    assert_eq!(
        delivered.last(),
        Some(&marker.id),
        "nothing acked came back"
    );
    billing.shutdown().await;
    users.shutdown().await;
    third.stop().await;
}

/// A TCP proxy in front of a gateway that cuts its connections on demand, and drops
/// the new ones while it is down.
struct Proxy {
    base: String,
    down: Arc<std::sync::atomic::AtomicBool>,
    connections: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn to(target: &str) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("the proxy's port");
        let base = format!("http://{}", listener.local_addr().expect("its address"));
        let target = target.trim_start_matches("http://").to_string();
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let connections = Arc::new(std::sync::Mutex::new(Vec::new()));
        let task = {
            let down = Arc::clone(&down);
            let connections = Arc::clone(&connections);
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if down.load(std::sync::atomic::Ordering::SeqCst) {
                        continue;
                    }
                    let target = target.clone();
                    let forward = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections
                        .lock()
                        .expect("the proxy's connections")
                        .push(forward.abort_handle());
                }
            })
        };
        Proxy {
            base,
            down,
            connections,
            task,
        }
    }

    /// Cuts every connection and drops new ones until [`Proxy::up`].
    fn cut(&self) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        for connection in self
            .connections
            .lock()
            .expect("the proxy's connections")
            .drain(..)
        {
            connection.abort();
        }
    }

    fn up(&self) {
        self.down.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// A subscription from now on the HTTP medium (through a proxy to the gateway), whose
/// stream is cut before any message reached it: messages published while it is cut
/// (straight on the gateway's medium) are delivered once it is back, with the ones
/// after, each once and in order. Without an anchor, the stream would open again
/// from the moment it came back and miss those messages. `named`: a named
/// subscription without a checkpoint, which starts from now too.
async fn from_now_keeps_what_a_broken_stream_missed(place: Place, named: bool) {
    let gw = Gw::start(&place).await;
    let billing = gw.peer("billing").await;
    let proxy = Proxy::to(&gw.base).await;
    let users = Intracom::connect(on_gateways(config("users"), &proxy.base, USERS))
        .await
        .expect("users on the HTTP medium");
    let subscription = if named {
        Subscription::named("inbox")
    } else {
        Subscription::new()
    };
    let mut inbox = users
        .subscribe(subscription.actions(["reload"]))
        .await
        .expect("a subscription from now");

    // Cut before any message: what is published now is after `subscribe` returned.
    proxy.cut();
    let mut published: Vec<String> = publish(&billing, 5)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    proxy.up();
    published.extend(publish(&billing, 3).await.into_iter().map(|(id, _)| id));

    // Up to the last one: every message published after subscribe returned, once,
    // in order (without an anchor, the five published during the cut are missing).
    let last = published.last().cloned();
    let mut delivered = Vec::new();
    while delivered.last() != last.as_ref() {
        receive(&mut inbox, &mut delivered, 1).await;
    }
    assert_eq!(
        delivered, published,
        "every message published after subscribe returned, once, in order"
    );
    // Nothing else is waiting: the next delivery is a marker published now.
    let marker = billing
        .publish(Message::broadcast("reload"))
        .await
        .expect("a marker");
    receive(&mut inbox, &mut delivered, 1).await;
    assert_eq!(delivered.last(), Some(&marker.id), "no message came twice");
    users.shutdown().await;
    billing.shutdown().await;
    drop(proxy);
    gw.stop().await;
}

/// Receives `count` deliveries, acks each, and notes its id.
async fn receive(inbox: &mut intracom::Subscriber, delivered: &mut Vec<String>, count: usize) {
    for _ in 0..count {
        let delivery = tokio::time::timeout(GUARD, inbox.next())
            .await
            .expect("a delivery within the hang guard")
            .expect("the subscription goes on")
            .expect("a delivery, not an error");
        delivered.push(delivery.id.clone());
        delivery.ack().await.expect("acked");
    }
}

/// A service token acts as its service only on the medium routes: it appends what its
/// service sends, follows what its service receives, keeps its checkpoints under its
/// service's name; the rest is refused with 403.
async fn service_token_acts_as_its_service_only() {
    use reqwest::StatusCode;
    use serde_json::json;
    let gw = Gw::start(&Place::Memory).await;
    let message = |source: &str| {
        let mut message = Message::broadcast("reload").from_service(source);
        message.source_instance = format!("{source}-1");
        let document = intracom::bson::to_document(&message).expect("a document");
        intracom::bson::Bson::Document(document).into_canonical_extjson()
    };
    // Another service's message: refused; its own: stored.
    let (status, body) = gw
        .post(
            "/medium/append",
            USERS,
            json!({ "messages": [message("billing")] }),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = gw
        .post(
            "/medium/append",
            BILLING,
            json!({ "messages": [message("billing")] }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body[0]["duplicate"], false, "{body}");
    // An action its service does not declare: refused by the catalog.
    let undeclared = {
        let mut message = Message::broadcast("not.declared").from_service("billing");
        message.source_instance = "billing-1".into();
        let document = intracom::bson::to_document(&message).expect("a document");
        intracom::bson::Bson::Document(document).into_canonical_extjson()
    };
    let (status, body) = gw
        .post(
            "/medium/append",
            BILLING,
            json!({ "messages": [undeclared] }),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    // Following another service's messages, or everything: refused.
    for filter in [json!({ "service": "billing" }), json!({})] {
        let (status, body) = gw
            .post("/medium/follow", USERS, json!({ "filter": filter }))
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{filter}: {body}");
    }
    // Claiming another service's work: refused.
    let (status, body) = gw
        .post(
            "/medium/work/claim",
            USERS,
            json!({ "service": "billing", "actions": ["reload"], "owner": "w", "lease_ms": 1000 }),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    // Declaring actions for another service: refused; repeating what it declares: fine.
    let (status, body) = gw
        .post(
            "/medium/catalog",
            USERS,
            json!({ "service": "billing", "actions": ["new.one"] }),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = gw
        .post(
            "/medium/catalog",
            USERS,
            json!({ "service": "billing", "actions": ["reload"] }),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    // A checkpoint saved by a service token lives under its service's name: the same
    // name for another service is another checkpoint.
    let position = json!({ "ts": { "$timestamp": { "t": 1, "i": 1 } } });
    let (status, body) = gw
        .post(
            "/medium/checkpoint/save",
            USERS,
            json!({ "name": "inbox", "position": position }),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (_, mine) = gw
        .post("/medium/checkpoint/load", USERS, json!({ "name": "inbox" }))
        .await;
    assert_eq!(mine["position"]["ts"], position["ts"], "{mine}");
    let (_, theirs) = gw
        .post(
            "/medium/checkpoint/load",
            BILLING,
            json!({ "name": "inbox" }),
        )
        .await;
    assert!(theirs["position"].is_null(), "{theirs}");
    let scoped = gw
        .bus
        .medium()
        .checkpoint_load("users/inbox")
        .await
        .expect("the medium's checkpoint");
    assert!(scoped.is_some(), "kept as users/inbox");
    // Reading the dead letters is an operator's.
    let (status, body) = gw
        .post("/medium/dead/list", USERS, json!({ "limit": 10 }))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    gw.stop().await;
}

/// A message as the medium routes carry it.
fn ext_of(message: &Message) -> serde_json::Value {
    let document = intracom::bson::to_document(message).expect("a document");
    intracom::bson::Bson::Document(document).into_canonical_extjson()
}

/// Posts `body` as `token` to a `/medium/work/...` route that answers `{done}`, and
/// checks the answer: 200 with `done` as `expected`.
async fn expect_done(gw: &Gw, path: &str, token: &str, body: serde_json::Value, expected: bool) {
    let (status, answer) = gw.post(path, token, body).await;
    assert_eq!(
        (status, &answer["done"]),
        (reqwest::StatusCode::OK, &serde_json::Value::Bool(expected)),
        "{path}: {answer}"
    );
}

/// A service token renews, settles and buries only under owners its service claimed
/// with, settles without an owner only work its service sent or is sent, and reads the
/// outcomes of its service's requests only; the service itself still can.
async fn service_token_ends_its_services_work_only(place: Place) {
    use reqwest::StatusCode;
    use serde_json::json;
    let gw = Gw::start(&place).await;
    let work = |id: &str| {
        let mut message = Message::to_service("billing", "invoice.get")
            .from_service("billing")
            .with_id(id)
            .work();
        message.source_instance = "billing-1".into();
        ext_of(&message)
    };
    let (status, body) = gw
        .post(
            "/medium/append",
            BILLING,
            json!({ "messages": [work("held"), work("waiting")] }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = gw
        .post(
            "/medium/work/claim",
            BILLING,
            json!({ "service": "billing", "actions": ["invoice.get"], "owner": "w", "lease_ms": 60000 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let held = body["message"]["_id"]
        .as_str()
        .expect("a claimed id")
        .to_string();
    let other = if held == "held" { "waiting" } else { "held" };
    // Another service's token, naming the same owner: the lease is not its.
    expect_done(
        &gw,
        "/medium/work/renew",
        USERS,
        json!({ "id": held, "owner": "w", "lease_ms": 60000 }),
        false,
    )
    .await;
    expect_done(
        &gw,
        "/medium/work/bury",
        USERS,
        json!({ "id": held, "owner": "w", "reason": "forged" }),
        false,
    )
    .await;
    let forged = json!({ "done": { "result": { "forged": true } } });
    expect_done(
        &gw,
        "/medium/work/settle",
        USERS,
        json!({ "id": held, "owner": "w", "settlement": forged }),
        false,
    )
    .await;
    // Without an owner, on pending work neither from nor to its service: refused.
    let (status, body) = gw
        .post(
            "/medium/work/settle",
            USERS,
            json!({ "id": other, "settlement": forged }),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    // The service itself: renews and settles under its owner, marks its other request.
    expect_done(
        &gw,
        "/medium/work/renew",
        BILLING,
        json!({ "id": held, "owner": "w", "lease_ms": 60000 }),
        true,
    )
    .await;
    expect_done(
        &gw,
        "/medium/work/settle",
        BILLING,
        json!({ "id": held, "owner": "w", "settlement": { "done": { "result": { "n": "one" } } } }),
        true,
    )
    .await;
    expect_done(&gw, "/medium/work/settle", BILLING, json!({ "id": other, "settlement": { "failed": { "response": { "error": "timed out" } } } }), true).await;
    // Outcomes: the asker's only.
    let (status, body) = gw
        .post(
            "/medium/work/outcome",
            USERS,
            json!({ "id": held, "timeout_ms": 1000 }),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = gw
        .post(
            "/medium/work/outcome",
            BILLING,
            json!({ "id": held, "timeout_ms": 1000 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["message"]["result"]["n"], json!("one"), "{body}");
    gw.stop().await;
}

/// A service token keeps dead letters of messages its service sent or is sent only: an
/// admin's retry republishes one as its sender.
async fn service_token_keeps_its_services_dead_letters_only() {
    use reqwest::StatusCode;
    use serde_json::json;
    let gw = Gw::start(&Place::Memory).await;
    let dead = |message: Message| json!({ "document": ext_of(&message), "reason": "r" });
    let cases = [
        (
            Message::broadcast("reload").from_service("billing"),
            StatusCode::FORBIDDEN,
        ),
        (
            Message::to_service("billing", "invoice.get").from_service("web"),
            StatusCode::FORBIDDEN,
        ),
        (
            Message::to_service("users", "user.deleted").from_service("billing"),
            StatusCode::NO_CONTENT,
        ),
        (
            Message::to_service("billing", "user.deleted").from_service("users"),
            StatusCode::NO_CONTENT,
        ),
    ];
    for (message, expected) in cases {
        let (status, body) = gw.post("/medium/dead", USERS, dead(message)).await;
        assert_eq!(status, expected, "{body}");
    }
    gw.stop().await;
}
