//! # intracom
//!
//! A message bus for a fleet of services that already share a MongoDB database: a
//! message is a document in one collection, stamped with the server's clock, and every
//! consumer follows the collection from the last position it handled. The same API
//! runs in one process on the [memory medium](medium::memory) (the default, no server
//! needed), on MongoDB ([`medium::mongo`]), and on an MQTT 5 broker (`medium::mqtt`,
//! feature `mqtt`); [`medium::connect`] picks one from the configuration.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use futures::StreamExt;
//! use intracom::{bson::doc, Config, Intracom, Message, Subscription};
//!
//! let config = Config::builder()
//!     .service("billing")
//!     .sender("billing", ["reload"])
//!     .sender("users", ["user.deleted"])
//!     .build()?;
//! let billing = Intracom::connect(config).await?;
//! let users = billing.as_service("users", None)?; // a second service in this process
//!
//! let mut inbox = users.subscribe(Subscription::named("users-inbox")).await?;
//! billing.publish(Message::to_service("users", "user.deleted").body(doc! { "id": 12 })).await?;
//!
//! let delivery = inbox.next().await.expect("a delivery")?;
//! assert_eq!(delivery.source_service, "billing");
//! assert_eq!(delivery.query.get_i32("id")?, 12);
//! delivery.ack().await?;
//! billing.shutdown().await;
//! # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
//! ```
//!
//! Layers, top to bottom: the [`Intracom`] handle; the [delivery
//! machinery](delivery) (subscriptions, acks, checkpoints); the [`Medium`] trait; one
//! module per medium under [`medium`].

#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backoff;
mod bus;
pub mod catalog;
pub mod config;
pub mod dead;
mod deadline;
pub mod delivery;
pub mod error;
pub mod filter;
#[cfg(feature = "gateway")]
#[cfg_attr(docsrs, doc(cfg(feature = "gateway")))]
pub mod gateway;
pub mod idempotency;
pub mod medium;
pub mod message;
pub mod metrics;
mod outbox;
mod stop;
#[cfg(feature = "http")]
mod stores;
#[cfg(any(feature = "mqtt", feature = "http"))]
mod tls;
pub mod trace;
pub mod work;

pub use bson;

pub use bus::{Intracom, PublishStatus, Published};
pub use catalog::Catalog;
pub use config::{
    Config, ConfigBuilder, DbConfig, HttpConfig, HubSelection, IdempotencyStoreKind, MediumKind,
    MessageStoreKind, MqttConfig, ReadPreference, Retention, StoresConfig, WorkOverrides,
};
pub use dead::DeadLetters;
pub use delivery::{Delivery, Subscriber, Subscription};
pub use error::{Error, PayloadError, Result};
pub use filter::{Filter, Position, SharedPosition, StartFrom};
pub use idempotency::{Idempotent, Once};
pub use medium::{Capabilities, DeadLetter, Medium};
pub use message::{DeliveryMode, Lease, Message, MessageType, State};
pub use outbox::OutboxRemoval;
pub use trace::TraceContext;
pub use work::{Request, WorkOptions, Worker};

/// The README's and the guide's Rust blocks, compiled as doctests (those not marked
/// `no_run` also run): `cargo test --doc` is the guide's `mdbook test`. A page with
/// Rust blocks that is not listed here fails `tests/docs.rs`.
#[cfg(doctest)]
mod guide_doctests {
    #[doc = include_str!("../README.md")]
    pub struct Readme;
    #[doc = include_str!("../docs/src/getting-started.md")]
    pub struct GettingStarted;
    #[doc = include_str!("../docs/src/concepts/message.md")]
    pub struct ConceptsMessage;
    #[doc = include_str!("../docs/src/concepts/catalog.md")]
    pub struct ConceptsCatalog;
    #[doc = include_str!("../docs/src/concepts/subscriptions.md")]
    pub struct ConceptsSubscriptions;
    #[doc = include_str!("../docs/src/patterns/request-reply.md")]
    pub struct PatternsRequestReply;
    #[doc = include_str!("../docs/src/patterns/work-queues.md")]
    pub struct PatternsWorkQueues;
    #[doc = include_str!("../docs/src/patterns/dead-letters.md")]
    pub struct PatternsDeadLetters;
    #[doc = include_str!("../docs/src/patterns/exactly-once.md")]
    pub struct PatternsExactlyOnce;
    #[doc = include_str!("../docs/src/media/memory.md")]
    pub struct MediaMemory;
    #[doc = include_str!("../docs/src/operating/checklist.md")]
    pub struct OperatingChecklist;
    #[doc = include_str!("../docs/src/testing.md")]
    pub struct Testing;
    #[cfg(feature = "otel")]
    #[doc = include_str!("../docs/src/operating/tracing.md")]
    pub struct OperatingTracing;
}
