//! Which messages a subscription wants, and where it starts.
//!
//! Why it exists: the delivery machinery builds a [`Filter`] from a subscription and
//! the bus's identity, and hands it to the medium, which applies it where it is
//! cheapest (in the server's `$match` for MongoDB, in the reader for memory). Both
//! layers then agree on one definition of "this message is for me": [`Filter::matches`].

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, OnceLock};

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

/// A message's [`Position`] as followers receive it ([`crate::medium::Event::Message`]):
/// cheap to clone, and made only if someone reads it.
///
/// A medium that has the whole position at hand wraps it ([`SharedPosition::new`]): its
/// clones share it. One that numbers its messages can defer it
/// ([`SharedPosition::deferred`]): a deferred position is a few numbers, copied by its
/// clones without any reference count or allocation (every delivery of a message to
/// every subscriber holds one), and each holder builds the token the first time it
/// reads it (a named subscription saving its checkpoint, a caller of
/// [`crate::Delivery::position`]): never for a message whose position nobody reads.
///
/// ```
/// use intracom::bson::{doc, Timestamp};
/// use intracom::{Position, SharedPosition};
///
/// let ts = Timestamp { time: 1, increment: 2 };
/// let made = SharedPosition::new(Position::new(ts, Some(doc! { "seq": 7_i64 })));
/// let deferred = SharedPosition::deferred(ts, 7, |ts, n| {
///     Position::new(ts, Some(doc! { "seq": n as i64 }))
/// });
/// assert_eq!(deferred.ts(), ts);
/// assert_eq!(made.get(), deferred.get());
/// ```
#[derive(Clone)]
pub struct SharedPosition(Repr);

#[derive(Clone)]
enum Repr {
    /// Made by the medium; clones share it.
    Made(Arc<Position>),
    /// Made by `make(ts, number)` when first read through this value.
    Deferred(Deferred),
    /// Made by a closure of the medium's when first read; clones share what it made.
    Lazy(Arc<Lazy>),
}

struct Lazy {
    /// What is known without making anything: the position less what `make` adds.
    base: Position,
    make: Box<dyn Fn(&Position) -> Position + Send + Sync>,
    made: OnceLock<Position>,
}

struct Deferred {
    ts: Timestamp,
    number: u64,
    make: fn(Timestamp, u64) -> Position,
    made: OnceLock<Box<Position>>,
}

impl Clone for Deferred {
    /// The parts, not what was made of them: a clone makes its own when read (copying
    /// a made position would allocate as much as making it).
    fn clone(&self) -> Self {
        Deferred {
            ts: self.ts,
            number: self.number,
            make: self.make,
            made: OnceLock::new(),
        }
    }
}

impl SharedPosition {
    /// A position already made.
    pub fn new(position: Position) -> Self {
        SharedPosition(Repr::Made(Arc::new(position)))
    }

    /// A position made by `make(ts, number)` when it is first read.
    pub fn deferred(ts: Timestamp, number: u64, make: fn(Timestamp, u64) -> Position) -> Self {
        SharedPosition(Repr::Deferred(Deferred {
            ts,
            number,
            make,
            made: OnceLock::new(),
        }))
    }

    /// A position made from `base` by `make` when it is first read (what it needs is
    /// kept until then: a medium shares what it holds anyway instead of copying it per
    /// delivery). [`SharedPosition::compact`] gives `base` without making it.
    pub(crate) fn lazily(
        base: Position,
        make: impl Fn(&Position) -> Position + Send + Sync + 'static,
    ) -> Self {
        SharedPosition(Repr::Lazy(Arc::new(Lazy {
            base,
            make: Box::new(make),
            made: OnceLock::new(),
        })))
    }

    /// The position without what a medium adds only for a restart from a saved
    /// checkpoint (the ids delivered within a safety window before it): short enough for
    /// an SSE event id, and cheap. Resuming from it is as exact as from the whole one but
    /// where the server's history of the window is gone.
    #[cfg(feature = "gateway")]
    pub(crate) fn compact(&self) -> &Position {
        match &self.0 {
            Repr::Lazy(l) => &l.base,
            _ => self.get(),
        }
    }

    /// The order stamp (without making the position).
    pub fn ts(&self) -> Timestamp {
        match &self.0 {
            Repr::Made(position) => position.ts,
            Repr::Deferred(d) => d.ts,
            Repr::Lazy(l) => l.base.ts,
        }
    }

    /// The position, made now if it was deferred and not read through this value yet.
    pub fn get(&self) -> &Position {
        match &self.0 {
            Repr::Made(position) => position,
            Repr::Deferred(d) => d.made.get_or_init(|| Box::new((d.make)(d.ts, d.number))),
            Repr::Lazy(l) => l.made.get_or_init(|| (l.make)(&l.base)),
        }
    }
}

impl From<Position> for SharedPosition {
    fn from(position: Position) -> Self {
        SharedPosition::new(position)
    }
}

impl fmt::Debug for SharedPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.get().fmt(f)
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
    /// workers; the work itself is claimed, see [`crate::medium::WorkQueue::claim`]).
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

    #[test]
    fn a_deferred_position_is_made_when_first_read_once_per_holder() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static MADE: AtomicUsize = AtomicUsize::new(0);
        fn make(ts: Timestamp, n: u64) -> Position {
            MADE.fetch_add(1, Ordering::SeqCst);
            Position::new(ts, Some(bson::doc! { "seq": n as i64 }))
        }
        let ts = Timestamp {
            time: 3,
            increment: 4,
        };
        let shared = SharedPosition::deferred(ts, 9, make);
        let copies = [shared.clone(), shared.clone()];
        assert_eq!(shared.ts(), ts);
        assert_eq!(MADE.load(Ordering::SeqCst), 0, "not made before it is read");
        let first = copies[0].get();
        assert_eq!(first.ts, ts);
        assert_eq!(first.token, Some(bson::doc! { "seq": 9_i64 }));
        assert!(std::ptr::eq(first, copies[0].get()), "made once per holder");
        assert_eq!(MADE.load(Ordering::SeqCst), 1);
        assert_eq!(copies[1].get(), first, "every copy makes the same position");
        assert_eq!(MADE.load(Ordering::SeqCst), 2);
        // A made position is shared by its clones.
        let made = SharedPosition::new(Position::new(ts, None));
        assert!(std::ptr::eq(made.get(), made.clone().get()));
    }
}
