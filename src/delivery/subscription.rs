//! What a subscription asks for.

use std::collections::BTreeSet;

use crate::filter::{Filter, StartFrom};
use crate::message::MessageType;

/// Options of a subscription, built fluently and passed to
/// [`crate::Intracom::subscribe`].
///
/// By default a subscription receives, from the moment it is created, every message
/// for its bus's service: broadcasts, messages to the service, and messages to its own
/// instance. A *named* subscription keeps a checkpoint in the medium and resumes after
/// its last acknowledged message when it is created again, in this process or another.
///
/// ```
/// use intracom::Subscription;
/// let sub = Subscription::named("billing-cache").actions(["reload"]).from_beginning();
/// assert_eq!(sub.name(), Some("billing-cache"));
/// ```
#[derive(Clone, Debug, Default)]
pub struct Subscription {
    pub(crate) name: Option<String>,
    pub(crate) actions: Option<BTreeSet<String>>,
    pub(crate) sources: Option<BTreeSet<String>>,
    pub(crate) types: Option<BTreeSet<MessageType>>,
    pub(crate) start: StartFrom,
    pub(crate) monitor: bool,
    pub(crate) exclude_own: bool,
    /// The `subscription` label of this subscription's metrics when it is not the name:
    /// the gateway counts the subscriptions its clients name under their service, so
    /// that no client makes label values at will.
    pub(crate) metrics_label: Option<String>,
}

impl Subscription {
    /// A subscription without a checkpoint: it starts now and forgets its place when
    /// dropped.
    pub fn new() -> Self {
        Self::default()
    }

    /// A durable subscription: its position is saved after each ack, and a subscription
    /// created later with the same name resumes after the last acknowledged message
    /// (no gap; the unacknowledged in-flight messages come again).
    pub fn named(name: impl Into<String>) -> Self {
        Subscription {
            name: Some(name.into()),
            ..Self::default()
        }
    }

    /// A subscription that sees every message on the bus, whatever its destination
    /// (for tools and audits). It can be named too, with [`Subscription::name`].
    pub fn monitor() -> Self {
        Subscription {
            monitor: true,
            ..Self::default()
        }
    }

    /// The durable name, if any.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Names the subscription (see [`Subscription::named`]).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Counts this subscription's deliveries, acks and losses under `label` rather than
    /// its name.
    #[cfg(feature = "gateway")]
    pub(crate) fn metrics_label(mut self, label: impl Into<String>) -> Self {
        self.metrics_label = Some(label.into());
        self
    }

    /// Only these actions.
    pub fn actions<I, S>(mut self, actions: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.actions = Some(actions.into_iter().map(Into::into).collect());
        self
    }

    /// Only messages from these services.
    pub fn sources<I, S>(mut self, sources: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.sources = Some(sources.into_iter().map(Into::into).collect());
        self
    }

    /// Only these message types.
    pub fn types<I: IntoIterator<Item = MessageType>>(mut self, types: I) -> Self {
        self.types = Some(types.into_iter().collect());
        self
    }

    /// Where to start when there is no checkpoint (default [`StartFrom::Now`]).
    pub fn start(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }

    /// Start with the oldest message the medium retains, when there is no checkpoint.
    pub fn from_beginning(self) -> Self {
        self.start(StartFrom::Beginning)
    }

    /// Skip the messages this instance sent itself (a broadcast "to the other
    /// instances"). Default: they are delivered.
    pub fn exclude_own_instance(mut self) -> Self {
        self.exclude_own = true;
        self
    }

    pub(crate) fn filter(&self, service: &str, instance: &str) -> Filter {
        Filter {
            service: (!self.monitor).then(|| service.to_string()),
            instance: Some(instance.to_string()),
            actions: self.actions.clone(),
            sources: self.sources.clone(),
            types: self.types.clone(),
            exclude_instance: self.exclude_own.then(|| instance.to_string()),
            work: false,
        }
    }
}
