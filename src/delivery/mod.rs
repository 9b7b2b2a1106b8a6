//! The delivery machinery: subscriptions, deliveries, acks and checkpoints.
//!
//! Why it exists: between the bus handle and the medium sits the policy of delivery,
//! independent of how a medium stores or follows: what a subscription wants
//! ([`Subscription`]), how a consumer receives and acknowledges messages
//! ([`Subscriber`], [`Delivery`]), and where a named subscription resumes
//! (the checkpoint: the last message of the contiguous run of acked ones).

mod checkpoint;
pub(crate) mod processed;
pub(crate) mod routes;
mod subscriber;
mod subscription;

pub use subscriber::{Delivery, Subscriber};
pub use subscription::Subscription;

pub(crate) use checkpoint::AckTracker;
pub(crate) use subscriber::Screen;
