//! The bus handle: what a service holds to publish and subscribe.
//!
//! Why it exists: it is the one object a user deals with. It owns the policy that is
//! the same on every medium (identity of the sender, message validation, catalog
//! checks, size limits, shutdown) and hands storage and following to the medium.

use std::fmt;
use std::sync::Arc;

use bson::{RawDocumentBuf, Timestamp};
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::config::Config;
use crate::delivery::processed::Fallback;
use crate::delivery::routes::LocalRoutes;
use crate::delivery::{AckTracker, Screen, Subscriber, Subscription};
use crate::error::{Error, PayloadError, Result};
use crate::filter::StartFrom;
use crate::medium::Medium;
use crate::message::{check_name, Message};
use crate::outbox::{Outbox, OutboxRemoval};

/// A handle on the bus. Cheap to clone (an `Arc` inside), `Send + Sync`.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use futures::StreamExt;
/// use intracom::{bson::doc, Config, Intracom, Message, Subscription};
///
/// let config = Config::builder()
///     .service("billing")
///     .sender("billing", ["invoice.created", "reload"])
///     .build()?;
/// let bus = Intracom::connect(config).await?; // memory medium by default
/// let mut sub = bus.subscribe(Subscription::named("billing-cache").actions(["reload"])).await?;
/// bus.publish(Message::broadcast("reload").body(doc! { "tenant": 7 })).await?;
/// let delivery = sub.next().await.expect("a delivery")?;
/// assert_eq!(delivery.query.get_i32("tenant")?, 7);
/// delivery.ack().await?;
/// bus.shutdown().await;
/// # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
/// ```
#[derive(Clone)]
pub struct Intracom {
    shared: Arc<Shared>,
    service: Arc<str>,
    instance: Arc<str>,
}

pub(crate) struct Shared {
    config: Config,
    medium: Arc<dyn Medium>,
    catalog: Catalog,
    shutdown: crate::stop::Stop,
    /// Whether shutting the bus down closes the medium (it does when `connect` made it).
    owns_medium: bool,
    /// Handlers served in this process (the local route).
    pub(crate) routes: LocalRoutes,
    /// Publishes waiting for the medium to come back.
    outbox: Arc<Outbox>,
    /// The idempotency records kept in memory while the store is unreachable.
    pub(crate) fallback: Fallback,
    /// The gateway that keeps the external stores (`common.intracom.stores.*`).
    #[cfg(feature = "http")]
    stores: Option<Arc<crate::stores::HttpStores>>,
    /// `intracom_published_total` by status, taken once (a counter looked up per
    /// publish builds and hashes its key): see the recorder note in [`crate::metrics`].
    published: PublishedCounters,
}

impl Drop for Shared {
    /// The last handle of a bus dropped without [`Intracom::shutdown`]: the outbox's
    /// flusher sends what waits and ends, letting the medium (its change stream, its
    /// connections) go with the last of its other users.
    fn drop(&mut self) {
        self.outbox.abandon();
    }
}

struct PublishedCounters {
    stored: metrics::Counter,
    duplicate: metrics::Counter,
    buffered: metrics::Counter,
}

impl PublishedCounters {
    fn new(service: &str, medium: &'static str) -> Self {
        let counter = |status: &'static str| metrics::counter!(crate::metrics::PUBLISHED, "service" => service.to_string(), "medium" => medium, "status" => status);
        PublishedCounters {
            stored: counter("stored"),
            duplicate: counter("duplicate"),
            buffered: counter("buffered"),
        }
    }
}

/// A message checked for publishing, with its BSON encoding when the medium sends one
/// ([`Medium::sends_encoded`]): made once, for the size check, and handed to the
/// medium, which sends those bytes rather than encoding the message again. A medium
/// that keeps messages as they are (memory) gets none: the size is counted instead.
pub(crate) struct Prepared {
    pub(crate) message: Message,
    encoded: Option<RawDocumentBuf>,
}

impl Prepared {
    /// Makes a message ready for `medium` (see [`encode_for`]).
    pub(crate) fn for_medium(message: Message, medium: &dyn Medium) -> Result<Self> {
        let (encoded, _) = encode_for(&message, medium)?;
        Ok(Prepared { message, encoded })
    }
}

/// A message's encoding for `medium` and its encoded size: encoded when the medium
/// sends the bytes, counted otherwise (encoded after all when the count leaves a value
/// to the encoder).
/// The bytes left for the service's part of `<service>-<instance>` under
/// [`MAX_NAME_LEN`](crate::message::MAX_NAME_LEN).
fn derived_room(instance: &str) -> usize {
    crate::message::MAX_NAME_LEN.saturating_sub(instance.len() + 1)
}

fn encode_for(message: &Message, medium: &dyn Medium) -> Result<(Option<RawDocumentBuf>, usize)> {
    let sends = medium.sends_encoded();
    if !sends {
        if let Some(size) = message.counted_len() {
            return Ok((None, size));
        }
    }
    let encoded = bson::to_raw_document_buf(message).map_err(PayloadError::from)?;
    let size = encoded.as_bytes().len();
    Ok((sends.then_some(encoded), size))
}

/// What became of a published message.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublishStatus {
    /// Written to the medium now.
    Stored,
    /// A message with this id was already stored; nothing new was written.
    Duplicate,
    /// The medium is unavailable: the message waits in the outbox and is sent, in
    /// order, when the medium is back.
    Buffered,
}

/// The receipt of a publish.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Published {
    /// The message id.
    pub id: String,
    /// The medium's stamp, when known.
    pub ts: Option<Timestamp>,
    /// Stored now, or already there.
    pub status: PublishStatus,
}

impl Intracom {
    /// Connects to the medium named by the configuration and seeds the catalog from it.
    pub async fn connect(config: Config) -> Result<Self> {
        let medium = crate::medium::connect(&config).await?;
        Self::start(config, medium, true).await
    }

    /// A bus on a medium the caller made, e.g. one
    /// [`MemoryMedium`](crate::medium::memory::MemoryMedium) shared by several
    /// services of one process. Shutting this bus down does not close the medium.
    pub async fn with_medium(config: Config, medium: Arc<dyn Medium>) -> Result<Self> {
        Self::start(config, medium, false).await
    }

    async fn start(config: Config, medium: Arc<dyn Medium>, owns_medium: bool) -> Result<Self> {
        for (service, actions) in &config.senders {
            medium.catalog_add(service, actions).await?;
        }
        let catalog = Catalog::new(Arc::clone(&medium));
        catalog.refresh().await?;
        let instance = config.instance_or_default();
        let outbox = Arc::new(Outbox::open(
            config.outbox_max_messages,
            config.outbox_file.clone(),
        )?);
        let fallback = Fallback::new(std::time::Duration::from_millis(config.timeout_ms));
        #[cfg(feature = "http")]
        let stores = crate::stores::HttpStores::from_config(&config)?;
        #[cfg(not(feature = "http"))]
        if config.stores.any_http() {
            return Err(Error::Unsupported {
                medium: "stores".into(),
                what: "`http` stores (common.intracom.stores.*) in this build: enable the `http` feature".into(),
            });
        }
        #[cfg(feature = "http")]
        outbox.set_store(stores.clone().filter(|s| s.keeps_messages()));
        let shutdown = crate::stop::Stop::new();
        tokio::spawn(Arc::clone(&outbox).run(Arc::clone(&medium), shutdown.token().clone()));
        tracing::info!(medium = medium.name(), service = %config.service, %instance, "intracom started");
        let published = PublishedCounters::new(&config.service, medium.name());
        Ok(Intracom {
            service: config.service.as_str().into(),
            instance: instance.into(),
            shared: Arc::new(Shared {
                config,
                medium,
                catalog,
                shutdown,
                owns_medium,
                routes: LocalRoutes::default(),
                outbox,
                fallback,
                #[cfg(feature = "http")]
                stores,
                published,
            }),
        })
    }

    /// Another handle on the same bus for another service of this process (a
    /// monolith deployment). It shares the medium, catalog and shutdown.
    ///
    /// Without `instance`, the handle's instance is `<service>-<this bus's instance>`,
    /// the service's part cut short (on a character boundary) when the whole would be
    /// longer than a name may be ([`MAX_NAME_LEN`](crate::message::MAX_NAME_LEN)): an
    /// instance is addressed within its service, so the cut never mixes two services.
    /// A bus whose own instance leaves no room for one character of the service
    /// (255 bytes or more) gets an error asking for the instance.
    pub fn as_service(&self, service: &str, instance: Option<&str>) -> Result<Self> {
        check_name("service", service)?;
        let instance = match instance {
            Some(i) => {
                check_name("instance", i)?;
                i.to_string()
            }
            None => {
                let room = derived_room(&self.instance);
                if room == 0 {
                    // Not one character of the service would fit: cutting the bus's
                    // instance instead could make two processes' names the same.
                    return Err(Error::invalid(format!(
                        "the instance of a handle for `{service}` is derived as `<service>-<instance>`, \
                         and this bus's instance ({} bytes) leaves no room under {} bytes: pass the instance",
                        self.instance.len(),
                        crate::message::MAX_NAME_LEN
                    )));
                }
                let mut cut = service.len().min(room);
                while !service.is_char_boundary(cut) {
                    cut -= 1;
                }
                format!("{}-{}", &service[..cut], self.instance)
            }
        };
        Ok(Intracom {
            shared: Arc::clone(&self.shared),
            service: service.into(),
            instance: instance.into(),
        })
    }

    /// The room left for a service's part in an instance that [`Intracom::as_service`]
    /// derives from this handle's, in bytes (0: it cannot derive one).
    #[cfg(feature = "gateway")]
    pub(crate) fn derived_room(&self) -> usize {
        derived_room(&self.instance)
    }

    /// This handle's service name (`serviceNameSource` of what it publishes).
    pub fn service(&self) -> &str {
        &self.service
    }

    /// This handle's instance id (`instanceSource` of what it publishes).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The configuration the bus was started with.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The sender/action catalog.
    pub fn catalog(&self) -> &Catalog {
        &self.shared.catalog
    }

    /// The medium under the bus.
    pub fn medium(&self) -> &Arc<dyn Medium> {
        &self.shared.medium
    }

    /// Publishes one message: fills in the sender, validates it, checks the catalog and
    /// the size limit (nothing is written if any check fails), then has the medium stamp
    /// and store it. Publishing the same message id again stores nothing new and
    /// reports [`PublishStatus::Duplicate`].
    pub async fn publish(&self, message: Message) -> Result<Published> {
        let mut out = self.publish_all(vec![message]).await?;
        out.pop()
            .ok_or_else(|| Error::refused(self.shared.medium.name(), "append returned no receipt"))
    }

    /// Publishes several messages in one call to the medium, in order. Every message is
    /// checked first: if one fails, none is written.
    pub async fn publish_all(&self, mut messages: Vec<Message>) -> Result<Vec<Published>> {
        // Checked where they are (a message is a few hundred bytes: not moved around).
        let mut encoded = Vec::new();
        for message in &mut messages {
            encoded.extend(self.check(message).await?);
        }
        self.append_checked(messages, encoded).await
    }

    /// Fills in the sender and checks a message for publishing: shape, catalog, size.
    pub(crate) async fn prepare(&self, mut message: Message) -> Result<Prepared> {
        let encoded = self.check(&mut message).await?;
        Ok(Prepared { message, encoded })
    }

    /// [`Intracom::prepare`] in place: returns the message's encoding when the medium
    /// takes one ([`Medium::sends_encoded`]).
    async fn check(&self, message: &mut Message) -> Result<Option<RawDocumentBuf>> {
        if self.shared.shutdown.is_stopped() {
            return Err(Error::Shutdown);
        }
        if message.source_service.is_empty() {
            // Copied, not formatted (`to_string` on an `Arc<str>` goes through `Display`).
            message.source_service.push_str(&self.service);
        }
        if *message.source_instance != *self.instance {
            message.source_instance.clear();
            message.source_instance.push_str(&self.instance);
        }
        // Written by the medium only.
        message.ts = None;
        message.at = None;
        message.lease = None;
        message.attempts = 0;
        // The publisher's trace context, unless the message brings one (the gateway's,
        // from an HTTP request's headers).
        #[cfg(feature = "otel")]
        if message.trace.is_none() {
            message.trace = crate::trace::TraceContext::current();
        }
        message.validate()?;
        self.shared.catalog.check(message).await?;
        let limit = self
            .shared
            .medium
            .max_message_bytes()
            .min(self.shared.config.max_message_bytes);
        let medium = &*self.shared.medium;
        let (encoded, mut size) = encode_for(message, medium)?;
        if medium.keeps_decoded() {
            size = size.max(message.kept_len());
        }
        if size > limit {
            return Err(Error::TooLarge {
                id: message.id.clone(),
                size,
                limit,
            });
        }
        Ok(encoded)
    }

    /// Hands checked messages to the medium, or to the outbox when the medium is
    /// unavailable (or while earlier messages still wait there, to keep the order).
    pub(crate) async fn append_prepared(&self, prepared: Vec<Prepared>) -> Result<Vec<Published>> {
        let mut messages = Vec::with_capacity(prepared.len());
        let mut encoded = Vec::with_capacity(prepared.len());
        for p in prepared {
            messages.push(p.message);
            encoded.extend(p.encoded);
        }
        self.append_checked(messages, encoded).await
    }

    /// [`Intracom::append_prepared`] for messages checked in place, with their
    /// encodings (one per message, or none).
    async fn append_checked(
        &self,
        messages: Vec<Message>,
        mut encoded: Vec<RawDocumentBuf>,
    ) -> Result<Vec<Published>> {
        // One encoding per message, or none at all (`Medium::append_encoded`).
        if encoded.len() != messages.len() {
            encoded.clear();
        }
        let outbox = &self.shared.outbox;
        if outbox.len() > 0 {
            return self.buffer(&messages);
        }
        let appended = match self.shared.medium.append_owned(messages, &encoded).await {
            Ok(appended) => appended,
            Err(crate::medium::NotAppended { error, messages }) if error.is_retryable() => {
                #[cfg(feature = "http")]
                if let Some(kept) = self.keep_in_store(&messages).await {
                    return kept;
                }
                tracing::warn!(%error, count = messages.len(), "medium unavailable: publish kept in the outbox");
                return self.buffer(&messages);
            }
            Err(not_appended) => return Err(not_appended.error),
        };
        Ok(appended
            .into_iter()
            .map(|a| {
                tracing::debug!(message_id = %a.id, ts = ?a.ts, duplicate = a.duplicate, "published");
                let counters = &self.shared.published;
                if a.duplicate { &counters.duplicate } else { &counters.stored }.increment(1);
                Published {
                    id: a.id,
                    ts: a.ts,
                    status: if a.duplicate {
                        PublishStatus::Duplicate
                    } else {
                        PublishStatus::Stored
                    },
                }
            })
            .collect())
    }

    /// Subscribes. A named subscription resumes after its checkpoint when it has one;
    /// otherwise it starts where the subscription says (default: now). The start is
    /// anchored before this returns: a message published after it returns is delivered.
    pub async fn subscribe(&self, subscription: Subscription) -> Result<Subscriber> {
        if self.shared.shutdown.is_stopped() {
            return Err(Error::Shutdown);
        }
        let medium = &self.shared.medium;
        if let Some(name) = &subscription.name {
            check_name("subscription name", name)?;
        }
        let checkpoint = match &subscription.name {
            Some(name) => medium.checkpoint_load(name).await?,
            None => None,
        };
        let resumed = checkpoint.is_some();
        let start = match checkpoint {
            Some(position) => StartFrom::After(position),
            None => subscription.start.clone(),
        };
        let filter = subscription.filter(&self.service, &self.instance);
        tracing::debug!(subscription = ?subscription.name, resumed, start = ?start, "subscribing");
        let events = match &subscription.name {
            Some(name) => medium.follow_durable(name, start, filter).await?,
            None => medium.follow(start, filter).await?,
        };
        let metric: Arc<str> = match (&subscription.metrics_label, &subscription.name) {
            (Some(label), _) | (None, Some(label)) => label.as_str().into(),
            (None, None) => "(anonymous)".into(),
        };
        let tracker = subscription.name.clone().map(|name| {
            Arc::new(AckTracker::new(name, Arc::clone(medium)).labelled(metric.to_string()))
        });
        // Monitors (tools, audits) see everything; consumers only what the catalog declares.
        let screen = (!subscription.monitor).then(|| Screen {
            catalog: self.shared.catalog.clone(),
            medium: Arc::clone(medium),
        });
        Ok(Subscriber::new(
            subscription.name,
            metric,
            events,
            tracker,
            screen,
            self.shared.shutdown.clone(),
        ))
    }

    /// Shuts the bus down for every handle that shares it: subscription streams end,
    /// later calls fail with [`Error::Shutdown`], and a medium made by
    /// [`Intracom::connect`] is closed.
    pub async fn shutdown(&self) {
        self.shared.shutdown.stop();
        if self.shared.owns_medium {
            self.shared.medium.close().await;
        }
        tracing::info!(service = %self.service, instance = %self.instance, "intracom shut down");
    }

    fn buffer(&self, messages: &[Message]) -> Result<Vec<Published>> {
        self.shared.outbox.push(messages)?;
        self.shared
            .published
            .buffered
            .increment(messages.len() as u64);
        Ok(messages
            .iter()
            .map(|m| Published {
                id: m.id.clone(),
                ts: None,
                status: PublishStatus::Buffered,
            })
            .collect())
    }

    /// How many published messages wait in the outbox for the medium.
    pub fn outbox_len(&self) -> usize {
        self.shared.outbox.len()
    }

    /// The published messages waiting in the outbox for the medium, oldest first
    /// (the messages not routed yet).
    pub fn outbox_messages(&self) -> Vec<Message> {
        self.shared.outbox.messages()
    }

    /// Takes a message out of the outbox before it is sent: [`OutboxRemoval::Removed`]
    /// (the outbox file, if any, is rewritten), [`OutboxRemoval::Sending`] while the
    /// outbox is handing it to the medium (it cannot be taken back), or
    /// [`OutboxRemoval::NotWaiting`] (sent already, or never kept).
    pub fn outbox_remove(&self, id: &str) -> Result<OutboxRemoval> {
        self.shared.outbox.remove(id)
    }

    /// Checks a message as [`Intracom::publish`] does, then hands it to the outbox
    /// instead of the medium: it is sent, after what already waits there, as soon as the
    /// medium takes it. Returns [`PublishStatus::Buffered`]; a full outbox is
    /// [`Error::OutboxFull`].
    pub async fn publish_later(&self, message: Message) -> Result<Published> {
        let message = self.prepare(message).await?.message;
        let mut out = self.buffer(std::slice::from_ref(&message))?;
        out.pop().ok_or_else(|| {
            Error::refused(self.shared.medium.name(), "the outbox returned no receipt")
        })
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// The gateway that keeps the external stores, when one is configured.
    #[cfg(feature = "http")]
    pub(crate) fn http_stores(&self) -> Option<&crate::stores::HttpStores> {
        self.shared.stores.as_deref()
    }

    /// Hands messages the medium could not take to the gateway's message store
    /// (`common.intracom.stores.messages=http`); what it does not take (it cannot be
    /// reached) waits in the outbox. `None` when no message store is configured, or when
    /// its API cannot carry these messages (requests, replies): the caller keeps them.
    #[cfg(feature = "http")]
    async fn keep_in_store(&self, messages: &[Message]) -> Option<Result<Vec<Published>>> {
        let store = self.http_stores().filter(|s| s.keeps_messages())?;
        if !messages.iter().all(crate::stores::HttpStores::can_keep) {
            return None;
        }
        let (kept, error) = store.keep(messages).await;
        if let Some(error) = &error {
            store.messages_fell_back(error);
        } else {
            store.messages_answered();
        }
        if kept < messages.len() {
            // The rest waits in the outbox, whose flusher hands it over later.
            return Some(
                self.buffer(&messages[kept..])
                    .map(|rest| self.kept_receipts(&messages[..kept]).chain(rest).collect()),
            );
        }
        Some(Ok(self.kept_receipts(messages).collect()))
    }

    /// The receipts of messages kept by the message store: sent when the gateway's
    /// medium takes them.
    #[cfg(feature = "http")]
    fn kept_receipts<'a>(&self, messages: &'a [Message]) -> impl Iterator<Item = Published> + 'a {
        self.shared
            .published
            .buffered
            .increment(messages.len() as u64);
        messages.iter().map(|m| Published {
            id: m.id.clone(),
            ts: None,
            status: PublishStatus::Buffered,
        })
    }

    pub(crate) fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.token().clone()
    }

    /// Whether [`Intracom::shutdown`] was called.
    pub fn is_shut_down(&self) -> bool {
        self.shared.shutdown.is_stopped()
    }
}

impl fmt::Debug for Intracom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Intracom")
            .field("medium", &self.shared.medium.name())
            .field("service", &self.service)
            .field("instance", &self.instance)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::MAX_NAME_LEN;

    #[tokio::test]
    async fn a_long_service_name_gets_an_instance_that_fits() {
        // 2-byte characters, so that the cut falls inside one unless it is moved.
        let service = "é".repeat(MAX_NAME_LEN / 2);
        let config = Config::builder()
            .service("gateway")
            .sender(&service, ["reload"])
            .build()
            .expect("config");
        let bus = Intracom::connect(config).await.expect("bus");
        let handle = bus
            .as_service(&service, None)
            .expect("the longest service name");
        assert!(
            handle.instance().len() <= MAX_NAME_LEN,
            "{}",
            handle.instance()
        );
        assert!(handle.instance().ends_with(&format!("-{}", bus.instance())));
        handle
            .publish(Message::broadcast("reload"))
            .await
            .expect("its messages pass the name checks");
        let short = bus.as_service("users", None).expect("a short name");
        assert_eq!(short.instance(), format!("users-{}", bus.instance()));
        bus.shutdown().await;
    }

    #[tokio::test]
    async fn a_bus_instance_that_leaves_no_room_asks_for_the_instance() {
        for (len, derived) in [(MAX_NAME_LEN - 2, Some("u-")), (MAX_NAME_LEN - 1, None)] {
            let config = Config::builder()
                .service("gateway")
                .instance("i".repeat(len))
                .sender("users", ["reload"])
                .build()
                .expect("config");
            let bus = Intracom::connect(config).await.expect("bus");
            match (bus.as_service("users", None), derived) {
                (Ok(handle), Some(prefix)) => {
                    assert_eq!(handle.instance().len(), MAX_NAME_LEN);
                    assert!(
                        handle.instance().starts_with(prefix),
                        "{}",
                        handle.instance()
                    );
                    handle
                        .publish(Message::broadcast("reload"))
                        .await
                        .expect("its messages pass the name checks");
                }
                (Err(Error::InvalidMessage { reason }), None) => {
                    assert!(reason.contains("pass the instance"), "{reason}")
                }
                (other, _) => panic!("instance of {len} bytes: {other:?}"),
            }
            let explicit = bus.as_service("users", Some("users-1")).expect("named");
            assert_eq!(explicit.instance(), "users-1");
            bus.shutdown().await;
        }
    }
}
