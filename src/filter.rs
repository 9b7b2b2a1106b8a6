//! Which messages a subscription wants, and where it starts.
//!
//! Why it exists: the delivery machinery builds a [`Filter`] from a subscription and
//! the bus's identity, and hands it to the medium, which applies it where it is
//! cheapest (in the server's `$match` for MongoDB, in the reader for memory). Both
//! layers then agree on one definition of "this message is for me": [`Filter::matches`].

use std::collections::BTreeSet;

use bson::{Document, Timestamp};
use serde::{Deserialize, Serialize};

use crate::message::{DeliveryMode, Message, MessageType};

/// A place in a medium's message order.
///
/// `ts` is the message's order stamp; `token` is whatever else the medium needs to
/// resume exactly there (a change-stream resume token for MongoDB, a sequence number for
/// memory), kept as-is. Positions are persisted by named subscriptions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Position {
    /// The order stamp of the message at this position.
    pub ts: Timestamp,
    /// The medium's own resume data, opaque to everything above the medium.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Document>,
}

impl Position {
    /// A position with a medium token.
    pub fn new(ts: Timestamp, token: Option<Document>) -> Self {
        Position { ts, token }
    }
}

/// Where a subscription starts when it has no checkpoint.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub enum StartFrom {
    /// Messages published after the subscription is created (the default). The medium
    /// anchors the start before `subscribe` returns, so nothing published after that
    /// return is missed.
    #[default]
    Now,
    /// The oldest message the medium still retains.
    Beginning,
    /// The messages after this position.
    After(Position),
}

/// The messages a subscription receives.
///
/// A message matches when all of these hold:
/// - its destination service is null (everyone) or `service`, unless `service` is
///   `None` (a monitor that sees every message);
/// - its destination instance is unset, or equals `instance` (monitors see all);
/// - its action is in `actions`, its source service in `sources` and its type in
///   `types`, where those sets are given;
/// - it was not sent by `exclude_instance`;
/// - it is for every instance (`delivery: all`): work-queue messages are claimed, not
///   followed, unless the filter is a monitor; a `work` filter takes only those.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Filter {
    /// The receiving service; `None` for a monitor.
    pub service: Option<String>,
    /// The receiving instance.
    pub instance: Option<String>,
    /// Only these actions.
    pub actions: Option<BTreeSet<String>>,
    /// Only from these services.
    pub sources: Option<BTreeSet<String>>,
    /// Only these types.
    pub types: Option<BTreeSet<MessageType>>,
    /// Skip messages sent by this instance.
    pub exclude_instance: Option<String>,
    /// Work instead of messages: only `delivery: one` for `service` (used to wake
    /// workers; the work itself is claimed, see [`crate::Medium::claim`]).
    pub work: bool,
}

impl Filter {
    /// A filter that lets every message through (what `intracom tail` uses).
    pub fn monitor() -> Self {
        Filter::default()
    }

    /// Whether `message` is for this filter's subscriber.
    pub fn matches(&self, message: &Message) -> bool {
        if let Some(service) = &self.service {
            if message
                .dest_service
                .as_ref()
                .is_some_and(|dest| dest != service)
            {
                return false;
            }
            if let Some(target) = &message.dest_instance {
                if self.instance.as_ref() != Some(target) {
                    return false;
                }
            }
            if (message.delivery == DeliveryMode::One) != self.work {
                return false;
            }
        }
        if self.exclude_instance.as_ref() == Some(&message.source_instance) {
            return false;
        }
        if let Some(actions) = &self.actions {
            if !actions.contains(&message.action) {
                return false;
            }
        }
        if let Some(sources) = &self.sources {
            if !sources.contains(&message.source_service) {
                return false;
            }
        }
        if let Some(types) = &self.types {
            if !types.contains(&message.kind) {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(dest: Option<&str>, instance: Option<&str>, action: &str) -> Message {
        let mut m = match (dest, instance) {
            (None, _) => Message::broadcast(action),
            (Some(s), None) => Message::to_service(s, action),
            (Some(s), Some(i)) => Message::to_instance(s, i, action),
        };
        m.source_service = "src".into();
        m.source_instance = "src-1".into();
        m
    }

    fn for_service(service: &str, instance: &str) -> Filter {
        Filter {
            service: Some(service.into()),
            instance: Some(instance.into()),
            ..Filter::default()
        }
    }

    #[test]
    fn destination_rules() {
        let f = for_service("billing", "billing-1");
        assert!(f.matches(&msg(None, None, "reload")));
        assert!(f.matches(&msg(Some("billing"), None, "x")));
        assert!(!f.matches(&msg(Some("users"), None, "x")));
        assert!(f.matches(&msg(Some("billing"), Some("billing-1"), "x")));
        assert!(!f.matches(&msg(Some("billing"), Some("billing-2"), "x")));
        assert!(Filter::monitor().matches(&msg(Some("billing"), Some("billing-2"), "x")));
    }

    #[test]
    fn action_source_type_and_own_instance() {
        let mut f = for_service("billing", "billing-1");
        f.actions = Some(["reload".to_string()].into());
        assert!(f.matches(&msg(None, None, "reload")));
        assert!(!f.matches(&msg(None, None, "other")));
        f.sources = Some(["users".to_string()].into());
        assert!(!f.matches(&msg(None, None, "reload")));
        f.sources = None;
        f.types = Some([MessageType::FireAndForget].into());
        assert!(!f.matches(&msg(None, None, "reload")));
        f.types = None;
        f.exclude_instance = Some("src-1".into());
        assert!(!f.matches(&msg(None, None, "reload")));
    }

    #[test]
    fn queue_messages_are_not_followed() {
        let mut m = msg(Some("billing"), None, "x");
        m.delivery = DeliveryMode::One;
        assert!(!for_service("billing", "billing-1").matches(&m));
        assert!(Filter::monitor().matches(&m));
    }
}
