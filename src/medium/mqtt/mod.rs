//! The MQTT medium (`common.intracom.medium=mqtt`, feature `mqtt`): the bus over an
//! MQTT 5 broker (Mosquitto, EMQX, HiveMQ…).
//!
//! Why it exists: an MQTT broker is one of the three media, and remote calls may be
//! routed over MQTT. Sites that run a broker instead of a shared
//! MongoDB get the same API. Each pattern of the bus maps to what MQTT 5 offers:
//!
//! | pattern | topics | QoS | properties |
//! | --- | --- | --- | --- |
//! | broadcast | `<prefix>/all/<action>` | 1 | message expiry interval = `timeout_ms`; content type `application/bson` |
//! | to a service | `<prefix>/svc/<service>/<action>` | 1 | as above |
//! | to one instance | `<prefix>/inst/<service>/<instance>/<action>` | 1 | as above |
//! | work and requests (one instance of a service) | published to `<prefix>/work/<service>/<action>`, taken through the shared subscription `$share/<service>/<prefix>/work/<service>/<action>` | 1 | a worker's connection has Receive Maximum 1: one job at a time; PUBACK after the job is settled |
//! | request/reply | the request as above, the outcome back on `<prefix>/reply/<client id>` | 1 | Response Topic + Correlation Data (the message id); the request's expiry is its `query_ms` |
//! | settled records (a local route's request) | `<prefix>/done/<service>/<action>` | 1 | message expiry |
//! | retention | every message | | Message Expiry Interval = `common.intracom.timeout_ms` (rounded up to seconds): the broker drops what waits longer |
//! | named subscriptions | the subscription's topics, on a persistent session `<client_id_prefix>sub-<name>` | 1 | Clean Start 0, Session Expiry Interval = `session_expiry_ms`, Receive Maximum 64; PUBACK only once the handler acked this and every earlier message (in receipt order) |
//! | the catalog | `<prefix>/catalog/<service>` and `<prefix>/catalog/<service>/<action>` | 1 | retained (one message per action: registrations from several processes add up) |
//! | worker presence | `<prefix>/workers/<service>/<client id>` | 1 | retained; the connection's Will (an empty retained message) deletes it if the worker dies |
//! | dead letters | `<prefix>/dead/<message id>` | 1 | retained; purge publishes an empty retained message |
//! | reading retained state | `<prefix>/fence/<client id>` | 1 | a message to itself: what the broker queued before it has arrived |
//! | retries, back-off | the worker keeps the job (no PUBACK) and runs it again after the back-off; after `max_attempts` it goes to the dead letters | | |
//! | outbox | publishes made while the broker is unreachable wait in the bus's outbox and are sent in order when it is back | | |
//!
//! What MQTT cannot give, this medium does not fake ([`Medium::capabilities`]):
//! - **no server stamps**: a broker stamps nothing, so `ts` and `at` stay `None`;
//!   positions carry only the delivery's rank within its subscription;
//! - **no history**: a subscription starts now; [`StartFrom::Beginning`] and
//!   [`StartFrom::After`] are refused (`Error::Unsupported`), and messages that
//!   expired while a consumer was away are not counted
//!   ([`Event::Lost`](crate::medium::Event::Lost) never comes);
//! - **no stored queue**: work published while no worker of the service is connected
//!   is refused ([`Error::NoWorker`], after waiting up to the request's time-out for
//!   one to appear) rather than lost; there is no priority order; Mosquitto hands a
//!   shared subscription's messages round-robin and does not pass the job of a worker
//!   whose connection died to another one (MQTT 5 §4.8.2 says it SHOULD): the job is
//!   lost with the connection. A worker that stops cleanly (or whose bus shuts down)
//!   hands back what it holds and what the broker queued for it, to another worker of
//!   the service or, if it was the last, to the dead letters;
//! - **no shared state**: a request's outcome is seen by the process that made the
//!   request; idempotency records are kept per process.
//!
//! A named subscription's place is the broker's persistent session: another process
//! with the same `client_id_prefix` resumes it. Two live subscriptions with one name
//! take the session from each other; the one taken over ends.

mod connection;
mod follow;
mod topics;
mod work;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bson::{doc, Document, RawDocumentBuf};
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use self::connection::{Conn, Inbound, Session, Settings};
use self::topics::Topics;
use self::work::Job;
use super::records::LocalRecords;
use super::{
    Appended, Capabilities, CatalogMap, ClaimRequest, DeadLetter, DeadLetterStore, EventStream,
    Medium, Records, Reservation, Settlement, WorkQueue, WorkStream,
};
use crate::config::Config;
use crate::error::{Error, PayloadError, Result};
use crate::filter::{Filter, Position, StartFrom};
use crate::message::{new_id, now_nanos, DeliveryMode, Message, State};

/// How long opening a connection waits for the broker.
const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// How long a read of retained state waits for the broker to answer.
const FENCE_WAIT: Duration = Duration::from_secs(10);
/// Unacknowledged messages a follower's connection takes at once.
const FOLLOW_WINDOW: u16 = 64;
/// Room above the largest message for the topic and properties of its packet.
const PACKET_OVERHEAD: usize = 64 * 1024;
/// Request outcomes and published ids remembered at most.
const REMEMBERED: usize = 100_000;

/// What this medium promises; see the module docs for what it lacks and why.
pub const CAPABILITIES: Capabilities = Capabilities {
    server_stamps: false,
    history: false,
    loss_reports: false,
    shared_checkpoints: true,
    stored_queue: false,
    shared_state: false,
};

/// The MQTT medium. See the module docs for the topic layout and its limits.
pub struct MqttMedium {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    config: Config,
    settings: Settings,
    topics: Topics,
    main: Arc<Conn>,
    reply_topic: String,
    fence_topic: String,
    catalog: Mutex<CatalogMap>,
    /// Worker presence: service → worker → (connection epoch of the main connection
    /// it was read on, actions). Only what was read on the current connection counts:
    /// a presence deleted while this connection was down is not sent again, but the
    /// live ones are (retained messages come with the re-subscription).
    workers: Mutex<HashMap<String, HashMap<String, Presence>>>,
    presence: watch::Sender<u64>,
    fences: Mutex<HashMap<String, oneshot::Sender<()>>>,
    /// The retained messages collected by the read in progress: (filter, topic → payload).
    retained_read: Mutex<Option<(String, HashMap<String, Bytes>)>>,
    read_lock: tokio::sync::Mutex<()>,
    outcomes: Mutex<Remembered<Message>>,
    outcome_tick: watch::Sender<u64>,
    /// Ids this medium published (a second publish of one is a duplicate).
    published: Mutex<Remembered<()>>,
    /// Named subscriptions of this process, by name.
    named: Mutex<HashMap<String, Arc<follow::Named>>>,
    /// Connections of named subscriptions that were dropped and are closing: the next
    /// subscription of that name waits for them (their acks go out first).
    closing: Mutex<HashMap<String, Arc<Conn>>>,
    /// Jobs held by this process's workers, by message id.
    jobs: Mutex<HashMap<String, Job>>,
    /// Workers whose job stream is live, and the stops of those that ended.
    live_workers: watch::Sender<usize>,
    stopping: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    conns: Mutex<Vec<Weak<Conn>>>,
    processed: LocalRecords,
    closed: CancellationToken,
}

/// A bounded map that forgets the oldest entries first, and entries older than the
/// retention.
pub(crate) struct Remembered<T> {
    map: HashMap<String, (Instant, T)>,
    order: VecDeque<String>,
    retention: Duration,
}

impl<T: Clone> Remembered<T> {
    fn new(retention: Duration) -> Self {
        Remembered {
            map: HashMap::new(),
            order: VecDeque::new(),
            retention,
        }
    }

    fn get(&self, key: &str) -> Option<T> {
        self.map
            .get(key)
            .filter(|(at, _)| at.elapsed() < self.retention)
            .map(|(_, v)| v.clone())
    }

    /// Inserts unless present; true when inserted.
    fn insert(&mut self, key: &str, value: T) -> bool {
        if self.get(key).is_some() {
            return false;
        }
        if self
            .map
            .insert(key.to_string(), (Instant::now(), value))
            .is_none()
        {
            self.order.push_back(key.to_string());
        }
        while self.order.len() > REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
        true
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn unavailable(reason: impl Into<String>) -> Error {
    Error::unavailable("mqtt", reason.into())
}

fn short_id() -> String {
    new_id().to_lowercase()
}

/// TLS for `mqtts://`: rustls with the ring provider, the system's roots or a CA file.
fn tls_config(config: &Config) -> Result<rumqttc::TlsConfiguration> {
    let roots = crate::tls::roots(
        "common.intracom.mqtt.ca_file",
        config.mqtt.ca_file.as_deref(),
        true,
        "mqtts://",
    )?;
    let tls = crate::tls::client_config(roots, "common.intracom.mqtt.url", &config.mqtt.url)?;
    Ok(rumqttc::TlsConfiguration::Rustls(Arc::new(tls)))
}

impl MqttMedium {
    /// Connects to the broker named by `common.intracom.mqtt.url` and reads the catalog
    /// and worker presence it retains. Fails with [`Error::Unavailable`] if the broker
    /// does not answer within 10 s.
    pub async fn connect(config: &Config) -> Result<Self> {
        let url = config.mqtt.parsed_url()?;
        let settings = Settings {
            host: url.host.clone(),
            port: url.port,
            tls: if url.tls {
                Some(tls_config(config)?)
            } else {
                None
            },
            credentials: config
                .mqtt
                .username
                .clone()
                .map(|user| (user, config.mqtt.password.clone().unwrap_or_default())),
            keep_alive: Duration::from_millis(config.mqtt.keep_alive_ms),
            max_incoming: u32::try_from(config.max_message_bytes.saturating_add(PACKET_OVERHEAD))
                .unwrap_or(u32::MAX)
                .min(268_435_455),
        };
        let topics = Topics::new(&config.mqtt.topic_prefix);
        let client_id = format!(
            "{}{}-{}",
            config.mqtt.client_id_prefix,
            config.instance.as_deref().unwrap_or("bus"),
            short_id()
        );
        let (main, inbound) = Conn::open(
            &settings,
            Session {
                client_id: client_id.clone(),
                persistent: false,
                expiry_secs: 0,
                receive_maximum: FOLLOW_WINDOW,
                will: None,
            },
            CONNECT_WAIT,
        )
        .await?;
        let retention = Duration::from_millis(config.timeout_ms);
        let inner = Arc::new(Inner {
            config: config.clone(),
            settings,
            reply_topic: topics.reply(&client_id),
            fence_topic: topics.fence(&client_id),
            topics,
            main: Arc::clone(&main),
            catalog: Mutex::new(CatalogMap::new()),
            workers: Mutex::new(HashMap::new()),
            presence: watch::channel(0).0,
            fences: Mutex::new(HashMap::new()),
            retained_read: Mutex::new(None),
            read_lock: tokio::sync::Mutex::new(()),
            outcomes: Mutex::new(Remembered::new(retention)),
            outcome_tick: watch::channel(0).0,
            published: Mutex::new(Remembered::new(retention)),
            named: Mutex::new(HashMap::new()),
            closing: Mutex::new(HashMap::new()),
            jobs: Mutex::new(HashMap::new()),
            live_workers: watch::channel(0).0,
            stopping: Mutex::new(Vec::new()),
            conns: Mutex::new(vec![Arc::downgrade(&main)]),
            processed: LocalRecords::new(config.memory_max_messages, retention),
            closed: CancellationToken::new(),
        });
        tokio::spawn(dispatch(Arc::downgrade(&inner), inbound));
        let filters = [
            inner.reply_topic.clone(),
            inner.fence_topic.clone(),
            inner.topics.catalog_all(),
            inner.topics.workers_all(),
        ]
        .into_iter()
        .map(|t| rumqttc::v5::mqttbytes::v5::Filter::new(t, QoS::AtLeastOnce))
        .collect();
        let ready = async {
            main.subscribe(filters, true).await?;
            inner.fence().await
        };
        if let Err(error) = ready.await {
            main.close().await;
            return Err(error);
        }
        tracing::info!(url = %config.mqtt.url, client_id = %main.client_id(), prefix = %config.mqtt.topic_prefix, "mqtt medium connected");
        Ok(MqttMedium { inner })
    }

    /// The broker's maximum packet size, from its CONNACK (`None`: it set none).
    pub fn broker_max_packet_size(&self) -> Option<u32> {
        self.inner.main.link().max_packet
    }

    /// What the broker publishes about itself under `$SYS/broker/` (Mosquitto and
    /// others; empty if the broker publishes nothing there or denies it), by topic.
    pub async fn broker_stats(&self) -> Result<Vec<BrokerStat>> {
        let found = self.inner.read_retained("$SYS/broker/#".into()).await?;
        let mut out: Vec<BrokerStat> = found
            .into_iter()
            .map(|(t, v)| BrokerStat {
                topic: t.strip_prefix("$SYS/broker/").unwrap_or(&t).to_string(),
                value: String::from_utf8_lossy(&v).into_owned(),
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// The workers present on the broker: how many worker connections each service
    /// has, by service.
    pub fn workers(&self) -> Vec<ServiceWorkers> {
        let epoch = self.inner.main.epoch();
        let workers = lock(&self.inner.workers);
        let mut out: Vec<ServiceWorkers> = workers
            .iter()
            .map(|(s, w)| (s, w.values().filter(|(e, _)| *e == epoch).count()))
            .filter(|(_, n)| *n > 0)
            .map(|(s, n)| ServiceWorkers {
                service: s.clone(),
                connections: n,
            })
            .collect();
        out.sort();
        out
    }
}

pub use super::{BrokerStat, ServiceWorkers};

impl Inner {
    /// Whether a worker of `service` for `action` is present (other than `except`, a
    /// worker's sanitized client id), as read on the current main connection.
    pub(super) fn worker_present(&self, service: &str, action: &str, except: Option<&str>) -> bool {
        let epoch = self.main.epoch();
        lock(&self.workers).get(service).is_some_and(|workers| {
            workers.iter().any(|(worker, (seen, actions))| {
                *seen == epoch && Some(worker.as_str()) != except && actions.contains(action)
            })
        })
    }

    /// Opens another connection of this medium (a follower's, a worker's).
    async fn open(
        &self,
        session: Session,
    ) -> Result<(Arc<Conn>, tokio::sync::mpsc::UnboundedReceiver<Inbound>)> {
        if self.closed.is_cancelled() {
            return Err(Error::Shutdown);
        }
        let (conn, rx) = Conn::open(&self.settings, session, CONNECT_WAIT).await?;
        let mut conns = lock(&self.conns);
        conns.retain(|c| c.strong_count() > 0);
        conns.push(Arc::downgrade(&conn));
        Ok((conn, rx))
    }

    fn client_id(&self, what: &str) -> String {
        format!("{}{what}-{}", self.config.mqtt.client_id_prefix, short_id())
    }

    fn expiry_secs(&self, ms: u64) -> u32 {
        u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX).max(1)
    }

    /// Publishes a message to itself and waits for it: everything the broker queued
    /// for the main connection before it (retained messages of a new subscription,
    /// what others published earlier) has arrived.
    async fn fence(&self) -> Result<()> {
        let token = short_id();
        let (tx, rx) = oneshot::channel();
        lock(&self.fences).insert(token.clone(), tx);
        let sent = self
            .main
            .publish(
                &self.fence_topic,
                Bytes::from(token.clone().into_bytes()),
                false,
                PublishProperties::default(),
            )
            .await;
        if let Err(error) = sent {
            lock(&self.fences).remove(&token);
            return Err(error);
        }
        match tokio::time::timeout(FENCE_WAIT, rx).await {
            Ok(Ok(())) => Ok(()),
            _ => {
                lock(&self.fences).remove(&token);
                Err(unavailable(
                    "the broker did not return a fence message in time",
                ))
            }
        }
    }

    /// Publishes a retained message (empty: deletes it) and waits for the PUBACK.
    async fn retain(&self, topic: &str, payload: Vec<u8>) -> Result<()> {
        self.main
            .publish(
                topic,
                Bytes::from(payload),
                true,
                PublishProperties::default(),
            )
            .await
    }

    fn note_outcome(&self, message: Message) -> bool {
        let inserted = lock(&self.outcomes).insert(&message.id.clone(), message);
        if inserted {
            self.outcome_tick.send_modify(|n| *n += 1);
        }
        inserted
    }

    /// Waits until a worker of `service` for `action` is present, up to `limit`.
    async fn wait_for_worker(&self, service: &str, action: &str, limit: Duration) -> Result<()> {
        let present = || self.worker_present(service, action, None);
        let mut tick = self.presence.subscribe();
        let deadline = crate::deadline::after(limit);
        loop {
            tick.borrow_and_update();
            if present() {
                return Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(Error::NoWorker {
                        service: service.to_string(),
                        action: action.to_string(),
                        waited: limit,
                    });
                }
                _ = tick.changed() => {}
                _ = self.closed.cancelled() => return Err(Error::Shutdown),
            }
        }
    }

    /// Reads the retained messages under `filter`: subscribes, fences, unsubscribes.
    async fn read_retained(&self, filter: String) -> Result<HashMap<String, Bytes>> {
        let _one_at_a_time = self.read_lock.lock().await;
        *lock(&self.retained_read) = Some((filter.clone(), HashMap::new()));
        let read = async {
            self.main
                .subscribe(
                    vec![rumqttc::v5::mqttbytes::v5::Filter::new(
                        filter.clone(),
                        QoS::AtLeastOnce,
                    )],
                    false,
                )
                .await?;
            self.fence().await?;
            self.main.unsubscribe(&filter).await
        };
        let outcome = read.await;
        let found = lock(&self.retained_read)
            .take()
            .map(|(_, f)| f)
            .unwrap_or_default();
        outcome?;
        Ok(found)
    }

    /// Reads retained dead letters matching `filter` (one id, or all), oldest first.
    async fn read_dead(&self, filter: String) -> Result<Vec<DeadLetter>> {
        let mut letters: Vec<DeadLetter> = Vec::new();
        for (topic, payload) in self.read_retained(filter).await? {
            match bson::from_slice::<Document>(&payload) {
                Ok(d) => letters.push(DeadLetter {
                    id: d.get_str("_id").unwrap_or_default().to_string(),
                    document: d.get_document("document").cloned().unwrap_or_default(),
                    reason: d.get_str("reason").unwrap_or_default().to_string(),
                    at: d.get_datetime("at").ok().copied(),
                }),
                Err(error) => tracing::warn!(%topic, %error, "unreadable dead letter skipped"),
            }
        }
        letters.sort_by_key(|d| (d.at, d.id.clone()));
        Ok(letters)
    }

    /// Marks an in-flight message of a named subscription as done (it was dead-lettered
    /// above the medium), so it does not hold the subscription's acks back.
    async fn release_named(&self, id: &str) {
        let named: Vec<Arc<follow::Named>> = lock(&self.named).values().cloned().collect();
        for n in named {
            n.release(id).await;
        }
    }

    /// A payload on an intracom topic that is not a message: logged, counted, and kept
    /// in the dead letters (raw, with its topic). Errors when it could not be kept.
    async fn dead_letter_unreadable(
        &self,
        publish: &Publish,
        error: &bson::de::Error,
    ) -> Result<()> {
        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
        tracing::warn!(%topic, %error, "a payload on an intracom topic is not a message: dead-lettered");
        metrics::counter!(crate::metrics::DEAD_LETTERED, "reason" => "unreadable").increment(1);
        let document = doc! {
            "topic": &topic,
            "payload": bson::Binary {
                subtype: bson::spec::BinarySubtype::Generic,
                bytes: publish.payload.to_vec(),
            },
        };
        let written = self
            .write_dead(document, format!("not a readable message: {error}"))
            .await;
        if let Err(error) = &written {
            tracing::warn!(%topic, %error, "unreadable payload not dead-lettered");
        }
        written
    }

    async fn write_dead(&self, document: Document, reason: String) -> Result<()> {
        let mut id = super::id_of(&document);
        if topics::check_level("id", &id).is_err() {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            bson::to_vec(&document)
                .unwrap_or_default()
                .hash(&mut hasher);
            id = format!("unreadable-{:016x}", hasher.finish());
        }
        let letter = doc! {
            "_id": &id,
            "document": document,
            "reason": reason,
            // The clock of the process that dead-lettered it: a broker stamps nothing.
            "at": bson::DateTime::now(),
        };
        let payload = bson::to_vec(&letter).map_err(PayloadError::from)?;
        self.retain(&self.topics.dead(&id)?, payload).await?;
        self.release_named(&id).await;
        Ok(())
    }
}

/// Sorts what arrives on the main connection: request outcomes, the catalog, worker
/// presence, fences and dead letters being read.
/// A worker's presence: the epoch of the main connection it was read on, its actions.
type Presence = (u64, BTreeSet<String>);

/// Whether a message is work for one worker that is not a request (a request's caller
/// waits for its time-out instead).
fn is_job(message: &Message) -> bool {
    message.delivery == DeliveryMode::One
        && message.state.unwrap_or(State::Pending) == State::Pending
        && message.query_id.is_none()
}

async fn dispatch(inner: Weak<Inner>, mut inbound: tokio::sync::mpsc::UnboundedReceiver<Inbound>) {
    while let Some(message) = inbound.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        let topic = String::from_utf8_lossy(&message.publish.topic).into_owned();
        let payload = &message.publish.payload;
        if let Some((filter, found)) = lock(&inner.retained_read).as_mut() {
            if !payload.is_empty() && topics::matches(filter, &topic) {
                found.insert(topic.clone(), payload.clone());
            }
        }
        match inner.topics.kind(&topic) {
            Some("reply") => match bson::from_slice::<Message>(payload) {
                Ok(outcome) => {
                    tracing::debug!(message_id = %outcome.id, state = ?outcome.state, "request outcome received");
                    inner.note_outcome(outcome);
                }
                Err(error) => {
                    let _ = inner.dead_letter_unreadable(&message.publish, &error).await;
                }
            },
            Some("catalog") if !payload.is_empty() => {
                if let Some((service, action)) = inner.topics.parse_catalog(&topic) {
                    let mut catalog = lock(&inner.catalog);
                    let entry = catalog.entry(service.to_string()).or_default();
                    if let Some(action) = action {
                        entry.insert(action.to_string());
                    }
                }
            }
            Some("workers") => {
                if let Some((service, worker)) = inner.topics.parse_worker(&topic) {
                    let mut workers = lock(&inner.workers);
                    let service = workers.entry(service.to_string()).or_default();
                    if payload.is_empty() {
                        service.remove(worker);
                    } else {
                        let actions = String::from_utf8_lossy(payload)
                            .lines()
                            .map(str::to_string)
                            .collect();
                        service.insert(worker.to_string(), (message.epoch(), actions));
                    }
                    drop(workers);
                    inner.presence.send_modify(|n| *n += 1);
                }
            }
            Some("fence") => {
                let token = String::from_utf8_lossy(payload).into_owned();
                if let Some(waiter) = lock(&inner.fences).remove(&token) {
                    let _ = waiter.send(());
                }
            }
            _ => {}
        }
        inner.main.ack(&message).await;
    }
}

#[async_trait]
impl Medium for MqttMedium {
    fn name(&self) -> &'static str {
        "mqtt"
    }

    fn max_message_bytes(&self) -> usize {
        self.inner.config.max_message_bytes
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn work(&self) -> Option<&dyn WorkQueue> {
        Some(self)
    }

    fn dead_letter_store(&self) -> Option<&dyn DeadLetterStore> {
        Some(self)
    }

    fn records(&self) -> Option<&dyn Records> {
        Some(self)
    }

    fn broker_report(&self) -> Option<&dyn super::BrokerReport> {
        Some(self)
    }

    fn sends_encoded(&self) -> bool {
        true
    }

    async fn append(&self, messages: &[Message]) -> Result<Vec<Appended>> {
        self.append_encoded(messages, &[]).await
    }

    async fn append_encoded(
        &self,
        messages: &[Message],
        encoded: &[RawDocumentBuf],
    ) -> Result<Vec<Appended>> {
        // The payload is the message's BSON: the bus's encoding when it made one per
        // message, encoded here otherwise.
        let encoded = (encoded.len() == messages.len()).then_some(encoded);
        let inner = &self.inner;
        if inner.closed.is_cancelled() {
            return Err(Error::Shutdown);
        }
        let link = inner.main.link();
        // Everything is checked before anything is sent.
        let mut ready = Vec::with_capacity(messages.len());
        for (index, message) in messages.iter().enumerate() {
            let duplicate = lock(&inner.published).get(&message.id).is_some();
            let topic = inner.topics.for_message(message)?;
            let payload = match encoded.and_then(|e| e.get(index)) {
                Some(bytes) => Bytes::copy_from_slice(bytes.as_bytes()),
                None => Bytes::from(bson::to_vec(message).map_err(PayloadError::from)?),
            };
            let request = message.delivery == DeliveryMode::One
                && message.state.unwrap_or(State::Pending) == State::Pending
                && message.query_id.is_some();
            let expiry_ms = match (request, message.query_ms) {
                (true, Some(ms)) => u64::try_from(ms).unwrap_or(1).min(inner.config.timeout_ms),
                _ => inner.config.timeout_ms,
            };
            let properties = PublishProperties {
                message_expiry_interval: Some(inner.expiry_secs(expiry_ms)),
                content_type: Some("application/bson".into()),
                response_topic: request.then(|| inner.reply_topic.clone()),
                correlation_data: request.then(|| Bytes::from(message.id.clone().into_bytes())),
                ..PublishProperties::default()
            };
            let size = connection::packet_size(&topic, &payload, &properties);
            if let Some(limit) = link.max_packet {
                if size > limit as usize {
                    return Err(Error::PacketTooLarge {
                        id: message.id.clone(),
                        size,
                        limit: limit as usize,
                    });
                }
            }
            ready.push((message, duplicate, topic, payload, properties));
        }
        // Work and requests go to a worker present on the broker; MQTT keeps no queue
        // for a topic nobody subscribed to.
        for (message, duplicate, ..) in &ready {
            if *duplicate
                || message.delivery != DeliveryMode::One
                || message.state.unwrap_or(State::Pending) != State::Pending
            {
                continue;
            }
            let service = message.dest_service.as_deref().unwrap_or_default();
            match message.query_ms.filter(|_| message.query_id.is_some()) {
                // A request goes out once a worker is there, or when its time-out has
                // passed: then nobody answers and the caller gets its time-out.
                Some(ms) => {
                    let limit = Duration::from_millis(u64::try_from(ms).unwrap_or(0));
                    match inner.wait_for_worker(service, &message.action, limit).await {
                        Ok(()) => {}
                        Err(Error::NoWorker { .. }) => {
                            tracing::warn!(message_id = %message.id, %service, action = %message.action, "no worker present: the request is sent, and nobody will answer it");
                        }
                        Err(error) => return Err(error),
                    }
                }
                None => {
                    let limit = Duration::from_millis(inner.config.request_timeout_ms);
                    inner
                        .wait_for_worker(service, &message.action, limit)
                        .await?;
                }
            }
        }
        let mut started = Vec::with_capacity(ready.len());
        for (message, duplicate, topic, payload, properties) in ready {
            if duplicate {
                started.push((message, topic, None));
                continue;
            }
            let confirm = inner
                .main
                .start_publish(&topic, payload, false, properties)
                .await?;
            started.push((message, topic, Some(confirm)));
        }
        let mut out = Vec::with_capacity(started.len());
        let mut nobody = None;
        for (message, topic, confirm) in started {
            let duplicate = confirm.is_none();
            if let Some(confirm) = confirm {
                let matched = connection::confirmed(confirm, &topic).await?;
                if !matched && is_job(message) {
                    // The presence read was stale: the broker had no worker's shared
                    // subscription for it and dropped it. Not published: a later append
                    // sends it again.
                    tracing::warn!(message_id = %message.id, %topic, "no worker subscribed: the broker dropped the work");
                    nobody.get_or_insert(message);
                    continue;
                }
                if !matched && message.delivery == DeliveryMode::One {
                    tracing::warn!(message_id = %message.id, %topic, "no worker subscribed: the request is lost, the caller will time out");
                }
                lock(&inner.published).insert(&message.id, ());
            }
            out.push(Appended {
                id: message.id.clone(),
                ts: None,
                duplicate,
            });
        }
        match nobody {
            Some(message) => Err(Error::NoWorker {
                service: message.dest_service.clone().unwrap_or_default(),
                action: message.action.clone(),
                waited: Duration::ZERO,
            }),
            None => Ok(out),
        }
    }

    async fn follow(&self, from: StartFrom, filter: Filter) -> Result<EventStream> {
        follow::open(&self.inner, None, from, filter).await
    }

    async fn follow_durable(
        &self,
        name: &str,
        from: StartFrom,
        filter: Filter,
    ) -> Result<EventStream> {
        follow::open(&self.inner, Some(name), from, filter).await
    }

    async fn catalog_load(&self) -> Result<CatalogMap> {
        self.inner.fence().await?;
        Ok(lock(&self.inner.catalog).clone())
    }

    async fn catalog_add(&self, service: &str, actions: &[String]) -> Result<()> {
        let inner = &self.inner;
        let mut topics = vec![(inner.topics.catalog(service, None)?, service)];
        for action in actions {
            topics.push((inner.topics.catalog(service, Some(action))?, action));
        }
        for (topic, name) in topics {
            inner.retain(&topic, name.as_bytes().to_vec()).await?;
        }
        lock(&inner.catalog)
            .entry(service.to_string())
            .or_default()
            .extend(actions.iter().cloned());
        Ok(())
    }

    async fn checkpoint_load(&self, _name: &str) -> Result<Option<Position>> {
        // The broker's persistent session is the position: resuming is connecting to it.
        Ok(None)
    }

    async fn checkpoint_save(&self, name: &str, position: &Position) -> Result<()> {
        let named = lock(&self.inner.named).get(name).cloned();
        if let Some(named) = named {
            named.acked_through(position).await;
        }
        Ok(())
    }

    async fn close(&self) {
        let inner = &self.inner;
        inner.closed.cancel();
        // Workers end their streams on the bus's shutdown; each stop hands back what
        // it holds and what the broker queued for it, on its still open connection.
        let mut live = inner.live_workers.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(2), live.wait_for(|n| *n == 0)).await;
        let stops: Vec<_> = lock(&inner.stopping).drain(..).collect();
        for stop in stops {
            let _ = stop.await;
        }
        work::hand_back_all(inner).await;
        let conns: Vec<Arc<Conn>> = lock(&inner.conns)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for conn in conns {
            conn.close().await;
        }
        tracing::info!(client_id = %inner.main.client_id(), "mqtt medium closed");
    }
}

#[async_trait]
impl super::BrokerReport for MqttMedium {
    fn workers(&self) -> Vec<ServiceWorkers> {
        MqttMedium::workers(self)
    }

    fn max_packet_size(&self) -> Option<u32> {
        self.broker_max_packet_size()
    }

    async fn broker_stats(&self) -> Result<Vec<BrokerStat>> {
        MqttMedium::broker_stats(self).await
    }
}

#[async_trait]
impl WorkQueue for MqttMedium {
    async fn claim(&self, _request: &ClaimRequest) -> Result<Option<Message>> {
        // Work is pushed (receive_work), never stored for a claim.
        Ok(None)
    }

    async fn receive_work(&self, request: &ClaimRequest) -> Result<Option<WorkStream>> {
        work::receive(&self.inner, request).await.map(Some)
    }

    async fn renew(&self, id: &str, _owner: &str, _lease: Duration) -> Result<bool> {
        // The broker keeps the job for this connection until it is acknowledged.
        Ok(lock(&self.inner.jobs).contains_key(id))
    }

    async fn settle(&self, id: &str, owner: Option<&str>, settlement: Settlement) -> Result<bool> {
        match owner {
            Some(_) => work::settle(&self.inner, id, settlement).await,
            None => {
                // The caller gave up waiting: the outcome it saw is the one that counts,
                // and a late answer is ignored.
                let (state, response, result) = match settlement {
                    Settlement::Done(result) => (State::Done, None, result),
                    Settlement::Failed(error) => (State::Error, Some(error), None),
                    Settlement::Retry { .. } => return Ok(false),
                };
                let mut outcome = Message::broadcast("outcome").with_id(id);
                outcome.state = Some(state);
                outcome.response = response;
                outcome.result = result;
                outcome.response_ts = Some(now_nanos());
                outcome.delivery = DeliveryMode::One;
                Ok(self.inner.note_outcome(outcome))
            }
        }
    }

    async fn bury(&self, id: &str, _owner: &str, reason: &str) -> Result<bool> {
        work::bury(&self.inner, id, reason).await
    }

    async fn await_outcome(&self, id: &str, timeout: Duration) -> Result<Option<Message>> {
        let deadline = crate::deadline::after(timeout);
        let mut tick = self.inner.outcome_tick.subscribe();
        loop {
            tick.borrow_and_update();
            if let Some(outcome) = lock(&self.inner.outcomes).get(id) {
                return Ok(Some(outcome));
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Ok(None),
                _ = self.inner.closed.cancelled() => return Err(Error::Shutdown),
                changed = tick.changed() => if changed.is_err() { return Ok(None) },
            }
        }
    }
}

#[async_trait]
impl DeadLetterStore for MqttMedium {
    async fn dead_letter(&self, document: Document, reason: String) -> Result<()> {
        self.inner.write_dead(document, reason).await
    }

    async fn dead_list(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let mut letters = self.inner.read_dead(self.inner.topics.dead_all()).await?;
        letters.truncate(limit);
        Ok(letters)
    }

    async fn dead_get(&self, id: &str) -> Result<Option<DeadLetter>> {
        let Ok(topic) = self.inner.topics.dead(id) else {
            return Ok(None);
        };
        Ok(self
            .inner
            .read_dead(topic)
            .await?
            .into_iter()
            .find(|d| d.id == id))
    }

    async fn dead_remove(&self, id: Option<&str>) -> Result<u64> {
        let letters = match id {
            Some(id) => self.dead_get(id).await?.into_iter().collect(),
            None => self.inner.read_dead(self.inner.topics.dead_all()).await?,
        };
        for letter in &letters {
            self.inner
                .retain(&self.inner.topics.dead(&letter.id)?, Vec::new())
                .await?;
        }
        Ok(letters.len() as u64)
    }
}

#[async_trait]
impl Records for MqttMedium {
    async fn processed_reserve(
        &self,
        consumer: &str,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<Reservation> {
        Ok(self.inner.processed.reserve(consumer, id, owner, lease))
    }

    async fn processed_complete(
        &self,
        consumer: &str,
        id: &str,
        owner: &str,
        result: Option<Document>,
    ) -> Result<()> {
        if self.inner.processed.complete(consumer, id, owner, result) {
            Ok(())
        } else {
            Err(Error::ReservationLost {
                consumer: consumer.to_string(),
                id: id.to_string(),
            })
        }
    }

    async fn processed_release(&self, consumer: &str, id: &str, owner: &str) -> Result<()> {
        self.inner.processed.release(consumer, id, owner);
        Ok(())
    }
}
