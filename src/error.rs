//! The one error type of the crate.
//!
//! Why it exists: a caller of a message bus has to decide, for every failure, whether
//! to fix its input, retry later, or give up. Each variant says which, and
//! [`Error::is_retryable`] answers the question for code that only wants to know that.

use std::fmt;

/// Everything that can go wrong in intracom.
///
/// Variants carry the names a person needs to fix the problem (the config key, the
/// service, the action), and keep the underlying error as `source` where there is one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration key has a value intracom cannot use, or the key itself is unknown.
    /// Fix the configuration; retrying does not help.
    #[error("config key `{key}`: {reason} (value: {value:?})")]
    Config {
        /// The key, as written in the properties file (e.g. `common.intracom.medium`).
        key: String,
        /// The offending value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The properties file could not be read.
    #[error("cannot read config file {path}: {source}")]
    ConfigFile {
        /// The file that was asked for.
        path: String,
        /// Why reading failed.
        #[source]
        source: std::io::Error,
    },

    /// The sending service is not in the catalog. Register it (`catalog().register`) or
    /// list it in `common.intracom.senders.list`. Nothing was written.
    #[error(
        "unknown sender service `{service}`: register it or add it to common.intracom.senders.list"
    )]
    UnknownSender {
        /// The service that tried to send.
        service: String,
    },

    /// The target service does not declare this action in the catalog. Nothing was written.
    #[error("service `{service}` does not declare action `{action}` (declared: {declared})")]
    UnknownAction {
        /// The service whose catalog entry was checked.
        service: String,
        /// The action that was asked for.
        action: String,
        /// The actions the service does declare, comma separated.
        declared: String,
    },

    /// The message is malformed (empty action, bad service name…). Nothing was written.
    #[error("invalid message: {reason}")]
    InvalidMessage {
        /// What is wrong.
        reason: String,
    },

    /// The message is larger than the medium accepts. Nothing was written.
    #[error("message {id} is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// The message id.
        id: String,
        /// Its size in bytes: encoded, or as the medium keeps it when that is more (the
        /// memory medium keeps messages decoded).
        size: usize,
        /// The limit in force.
        limit: usize,
    },

    /// The message would make an MQTT packet larger than the broker accepts (its
    /// CONNACK's Maximum Packet Size). Nothing was sent; make the payload smaller or
    /// raise the broker's `max_packet_size`.
    #[error("message {id} would be an MQTT packet of {size} bytes, over the broker's maximum packet size of {limit} bytes")]
    PacketTooLarge {
        /// The message id.
        id: String,
        /// The packet's size in bytes.
        size: usize,
        /// The broker's maximum packet size.
        limit: usize,
    },

    /// No worker of the target service was connected to take this work or request, and
    /// the medium keeps no queue (MQTT: the broker drops what nobody subscribed to).
    /// Nothing was sent. Start a worker of the service, then publish again.
    #[error("no worker of `{service}` for `{action}` is connected (waited {waited:?}); the MQTT medium keeps no queue: start a worker, then publish again")]
    NoWorker {
        /// The target service.
        service: String,
        /// The action.
        action: String,
        /// How long the publish waited for a worker.
        waited: std::time::Duration,
    },

    /// A payload could not be converted to or from BSON.
    #[error("payload conversion failed: {0}")]
    Payload(#[from] PayloadError),

    /// A subscription resumed from a position whose messages have already expired
    /// (retention) or were dropped from a full medium. The stream goes on after this
    /// item with the oldest message still retained: it is a report, not the end.
    #[error(
        "subscription `{subscription}` lost {count} message(s) that expired before it read them"
    )]
    Lost {
        /// The subscription name (or `(anonymous)`).
        subscription: String,
        /// How many messages were lost, as far as the medium knows.
        count: u64,
    },

    /// A [`run_once`](crate::Idempotent::run_once) handler ran, but its reservation had
    /// lapsed before its outcome was recorded (its process was paused past the lease)
    /// and another instance took the message over: this run's outcome was not recorded,
    /// the other instance's is. Not retryable. The handler's effect may then have
    /// happened twice: make it idempotent on the message id (a unique key) for this case.
    #[error(
        "the reservation of message `{id}` for `{consumer}` lapsed before its outcome was recorded: another instance took it over"
    )]
    ReservationLost {
        /// The consumer (`idempotent(consumer)`).
        consumer: String,
        /// The message id.
        id: String,
    },

    /// The medium could not be reached or did not answer in time. Retry later; the
    /// operation may or may not have happened (publishing is idempotent on the message id).
    #[error("medium `{medium}` unavailable: {reason}")]
    Unavailable {
        /// The medium name (`memory`, `db`, `mqtt`).
        medium: &'static str,
        /// What failed.
        reason: String,
        /// The driver's or the operating system's error, where there is one (see
        /// [`Error::driver_error`], [`Error::server_code`], [`Error::has_label`]).
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },

    /// The medium refused the operation for a reason retrying will not fix.
    #[error("medium `{medium}` refused the operation: {reason}")]
    Medium {
        /// The medium name.
        medium: &'static str,
        /// What the medium said.
        reason: String,
        /// The driver's error, where there is one (see [`Error::driver_error`]).
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },

    /// The configured medium is not part of this build or does not support the operation.
    #[error("medium `{medium}` does not support {what}")]
    Unsupported {
        /// The medium name.
        medium: String,
        /// What was asked for.
        what: String,
    },

    /// No answer to a request within its time-out. The request is marked
    /// `state: error` ("timed out") so no worker answers it late; sending it again is a
    /// new request.
    #[error("no answer from `{service}` to `{action}` within {after:?}")]
    Timeout {
        /// The target service.
        service: String,
        /// The action.
        action: String,
        /// The time-out that passed.
        after: std::time::Duration,
    },

    /// The handler of a request failed; its message is here. Retrying sends the same
    /// query again, which fails the same way unless the cause was transient.
    #[error("`{service}` failed `{action}`: {message}")]
    Remote {
        /// The target service.
        service: String,
        /// The action.
        action: String,
        /// The handler's error.
        message: String,
    },

    /// The medium is unavailable and the outbox is full: nothing was kept. Retry later,
    /// or raise `common.intracom.outbox.max_messages`.
    #[error("the medium is unavailable and the outbox is full ({capacity} messages)")]
    OutboxFull {
        /// The outbox capacity.
        capacity: usize,
    },

    /// An external store (the REST API of the gateway named by
    /// `common.intracom.stores.url`) could not be reached, did not answer in time, or
    /// answered that it cannot serve now (a 5xx, 429). Retry later; the bus keeps its
    /// records and messages in memory meanwhile and writes them back when it answers.
    #[error("{store} store at {url} unavailable: {reason}")]
    StoreUnavailable {
        /// `idempotency` or `messages`.
        store: &'static str,
        /// The URL called.
        url: String,
        /// What failed.
        reason: String,
        /// The HTTP client's error, where there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },

    /// An external store refused a call for a reason retrying will not fix: a token it
    /// does not know (401) or that may not use these records (403), a request it cannot
    /// read (400). Fix the configuration (`common.intracom.stores.*`).
    #[error("{store} store at {url} refused the call (HTTP {status}): {reason}")]
    StoreRefused {
        /// `idempotency` or `messages`.
        store: &'static str,
        /// The URL called.
        url: String,
        /// The HTTP status.
        status: u16,
        /// What the store said.
        reason: String,
    },

    /// The bus was shut down; the operation was not carried out.
    #[error("the bus is shut down")]
    Shutdown,

    /// An I/O operation of this process failed: listening on or serving a socket,
    /// drawing random bytes from the operating system. Fix the cause (an address in
    /// use, a permission) and start again.
    #[error("{what}: {source}")]
    Io {
        /// What was being done (`listening on 0.0.0.0:8080`).
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Whether the same call may succeed if made again later, unchanged.
    ///
    /// True for [`Error::Unavailable`], [`Error::StoreUnavailable`] and
    /// [`Error::OutboxFull`]: everything else needs a different input, configuration or
    /// build.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Unavailable { .. } | Error::StoreUnavailable { .. } | Error::OutboxFull { .. }
        )
    }

    /// Whether a subscription stream can go on after yielding this error.
    ///
    /// [`Error::Lost`] and [`Error::Payload`] (a message that does not decode into the
    /// consumer's type) are reports; the stream continues after them.
    pub fn is_report(&self) -> bool {
        matches!(self, Error::Lost { .. } | Error::Payload(_))
    }

    pub(crate) fn config(
        key: impl Into<String>,
        value: impl Into<String>,
        reason: impl fmt::Display,
    ) -> Self {
        Error::Config {
            key: key.into(),
            value: value.into(),
            reason: reason.to_string(),
        }
    }

    /// An [`Error::Io`]: `what` failed with `source`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// An [`Error::Unavailable`] of `medium` without an underlying error.
    pub fn unavailable(medium: &'static str, reason: impl Into<String>) -> Self {
        Error::Unavailable {
            medium,
            reason: reason.into(),
            source: None,
        }
    }

    /// An [`Error::Medium`] (the medium refused the operation) without an underlying
    /// error.
    pub fn refused(medium: &'static str, reason: impl Into<String>) -> Self {
        Error::Medium {
            medium,
            reason: reason.into(),
            source: None,
        }
    }

    /// The MongoDB driver's error behind an [`Error::Unavailable`] or an
    /// [`Error::Medium`] of the `db` medium, when the driver raised it.
    pub fn driver_error(&self) -> Option<&mongodb::error::Error> {
        std::error::Error::source(self)?.downcast_ref()
    }

    /// The MongoDB server's error code (`11000` for a duplicate key, `13` for
    /// unauthorized…), when the server answered with one.
    pub fn server_code(&self) -> Option<i32> {
        crate::medium::mongo::errors::code(self.driver_error()?)
    }

    /// Whether the driver labelled the error with `label` (`RetryableWriteError`,
    /// `TransientTransactionError`, `ResumableChangeStreamError`…).
    pub fn has_label(&self, label: &str) -> bool {
        self.driver_error()
            .is_some_and(|error| error.contains_label(label))
    }

    /// The driver's labels on the error, sorted; empty when it has none or did not come
    /// from the driver.
    pub fn labels(&self) -> Vec<&str> {
        let mut labels: Vec<&str> = self
            .driver_error()
            .map(|error| error.labels().iter().map(String::as_str).collect())
            .unwrap_or_default();
        labels.sort_unstable();
        labels
    }

    pub(crate) fn invalid(reason: impl fmt::Display) -> Self {
        Error::InvalidMessage {
            reason: reason.to_string(),
        }
    }
}

/// Why a payload did not convert to or from BSON.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// The value could not be written as a BSON document.
    #[error("cannot encode payload: {0}")]
    Encode(#[from] bson::ser::Error),
    /// The document does not have the shape of the requested type.
    #[error("cannot decode payload: {0}")]
    Decode(#[from] bson::de::Error),
    /// The value encodes to something other than a document (a number, a string…).
    #[error("payload must encode to a document, got {0}")]
    NotADocument(String),
}

/// Short for `std::result::Result<T, intracom::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
