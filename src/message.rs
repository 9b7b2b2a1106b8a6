//! The message: one document on the bus.
//!
//! Why it exists: every medium stores and every consumer reads the same shape, with
//! the field names of the Intracom message format (`serviceNameSource`, `serviceNameDest`,
//! `type`, `action`, `query`, `queryId`, `state`, `query_ts`…) so that a person reading
//! the collection in mongosh recognises it. The order stamp `ts` and the wall time
//! `at` are written by the medium (the database server's clock for MongoDB), never by
//! the sender: [`Message::ts`] is `None` until the message has been published.

use std::sync::Mutex;

use bson::{Document, Timestamp};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, PayloadError, Result};
use crate::trace::TraceContext;

/// Longest accepted service, instance or action name, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// What kind of exchange a message belongs to (`type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum MessageType {
    /// To every instance of every service (or of the services that subscribe to it).
    Broadcast,
    /// To a service or an instance, no answer expected.
    FireAndForget,
    /// A request whose answer is read later.
    Async,
    /// A request whose caller waits for the answer.
    Sync,
    /// The answer to a request.
    Response,
}

impl MessageType {
    /// The name stored in the `type` field.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::Broadcast => "broadcast",
            MessageType::FireAndForget => "fire_and_forget",
            MessageType::Async => "async",
            MessageType::Sync => "sync",
            MessageType::Response => "response",
        }
    }
}

impl std::str::FromStr for MessageType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "broadcast" => MessageType::Broadcast,
            "fire_and_forget" => MessageType::FireAndForget,
            "async" => MessageType::Async,
            "sync" => MessageType::Sync,
            "response" => MessageType::Response,
            other => return Err(Error::invalid(format!("unknown message type `{other}`"))),
        })
    }
}

/// Who among the target's instances gets the message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DeliveryMode {
    /// Every subscribed instance (the default).
    #[default]
    All,
    /// Exactly one instance of the target service (work queue).
    One,
}

impl DeliveryMode {
    /// The name stored in the `delivery` field.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryMode::All => "all",
            DeliveryMode::One => "one",
        }
    }
}

/// The state of a request (`state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum State {
    /// Not answered yet.
    Pending,
    /// Answered; `result` holds the answer.
    Done,
    /// Failed; `response` holds the error.
    Error,
}

impl State {
    /// The name stored in the `state` field.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Done => "done",
            State::Error => "error",
        }
    }
}

/// One message on the bus.
///
/// Build it with [`Message::broadcast`], [`Message::to_service`] or
/// [`Message::to_instance`], add a payload with [`Message::body`] or
/// [`Message::payload`], and publish it with [`crate::Intracom::publish`], which fills
/// in the sender from the bus's identity unless [`Message::from_service`] set it.
///
/// ```
/// use intracom::{Message, bson::doc};
/// let m = Message::to_service("billing", "invoice.created").body(doc! { "invoice": 42 });
/// assert_eq!(m.dest_service.as_deref(), Some("billing"));
/// assert!(m.ts.is_none()); // stamped by the medium on publish, never by the sender
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Message {
    /// Client-generated, sortable, unique id (a ULID). Publishing the same id twice
    /// stores the message once.
    #[serde(rename = "_id")]
    pub id: String,
    /// The medium's order stamp (BSON Timestamp from the server's clock); `None` until
    /// published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<Timestamp>,
    /// The medium's wall time at publish (drives retention); `None` until published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<bson::DateTime>,
    /// The sending service.
    #[serde(rename = "serviceNameSource")]
    pub source_service: String,
    /// The sending instance.
    #[serde(rename = "instanceSource")]
    pub source_instance: String,
    /// The target service; `None` (stored as null) means every service.
    #[serde(rename = "serviceNameDest")]
    pub dest_service: Option<String>,
    /// The target instance of `dest_service`, when the message is for one instance only.
    #[serde(
        rename = "instanceDest",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub dest_instance: Option<String>,
    /// The exchange this message belongs to.
    #[serde(rename = "type")]
    pub kind: MessageType,
    /// Every instance, or exactly one.
    #[serde(default)]
    pub delivery: DeliveryMode,
    /// The action, one of those the target declares in the catalog.
    pub action: String,
    /// The payload.
    #[serde(default)]
    pub query: Document,
    /// Correlation id linking a request and its outcome.
    #[serde(rename = "queryId", default, skip_serializing_if = "Option::is_none")]
    pub query_id: Option<String>,
    /// Request state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<State>,
    /// Outcome of a request: the error when `state` is `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<Document>,
    /// Outcome of a request: the answer when `state` is `done`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Document>,
    /// Creation time on the sender, in nanoseconds since the Unix epoch. Informative
    /// only: never used for ordering.
    pub query_ts: i64,
    /// Time the answer was written, in nanoseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_ts: Option<i64>,
    /// Request timeout in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_ms: Option<i64>,
    /// Work-queue order: higher first (default 0). Always stored, so that the claim's
    /// sort by priority never meets a missing field (which sorts below every number).
    #[serde(default)]
    pub priority: i32,
    /// How many times the work was claimed (written by the medium).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: i32,
    /// Who holds the work and until when (written by the medium).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
    /// The error of the last failed attempt.
    #[serde(rename = "lastError", default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// For a message re-published from the dead letters: the id of the original.
    #[serde(rename = "retryOf", default, skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<String>,
    /// The publisher's W3C trace context (`trace: {traceparent, tracestate}`): stored by
    /// a publish with the feature `otel` (the current span's), or by the gateway from an
    /// HTTP request's headers; carried as it is otherwise. See [`crate::trace`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceContext>,
}

/// A work-queue lease: the instance that holds the work, since when, for how long.
///
/// Both times are the medium's: `at` is written by the server (`$currentDate` on
/// MongoDB) when the lease is taken or renewed, and the lease ends `ms` milliseconds
/// later by the server's clock (`$$NOW`). No client clock takes part, so workers whose
/// clocks disagree still agree on who holds the work.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Lease {
    /// The holding instance (or `backoff` while a failed item waits for its retry).
    pub owner: String,
    /// When the lease was taken or last renewed, on the medium's clock.
    pub at: bson::DateTime,
    /// How long it lasts from `at`, in milliseconds.
    pub ms: i64,
}

impl Lease {
    /// When the lease ends, on the medium's clock.
    pub fn until(&self) -> bson::DateTime {
        bson::DateTime::from_millis(self.at.timestamp_millis().saturating_add(self.ms))
    }
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

impl Message {
    fn new(
        kind: MessageType,
        dest_service: Option<String>,
        dest_instance: Option<String>,
        action: String,
    ) -> Self {
        Message {
            id: new_id(),
            ts: None,
            at: None,
            source_service: String::new(),
            source_instance: String::new(),
            dest_service,
            dest_instance,
            kind,
            delivery: DeliveryMode::All,
            action,
            query: Document::new(),
            query_id: None,
            state: None,
            response: None,
            result: None,
            query_ts: now_nanos(),
            response_ts: None,
            query_ms: None,
            priority: 0,
            attempts: 0,
            lease: None,
            last_error: None,
            retry_of: None,
            trace: None,
        }
    }

    /// A message for every instance of every service (`serviceNameDest: null`,
    /// `type: broadcast`). The action must be one the sender declares.
    pub fn broadcast(action: impl Into<String>) -> Self {
        Self::new(MessageType::Broadcast, None, None, action.into())
    }

    /// A message for every instance of one service (`type: fire_and_forget`). The
    /// action must be one that service declares.
    pub fn to_service(service: impl Into<String>, action: impl Into<String>) -> Self {
        Self::new(
            MessageType::FireAndForget,
            Some(service.into()),
            None,
            action.into(),
        )
    }

    /// A message for one instance of a service (`instanceDest` set).
    pub fn to_instance(
        service: impl Into<String>,
        instance: impl Into<String>,
        action: impl Into<String>,
    ) -> Self {
        Self::new(
            MessageType::FireAndForget,
            Some(service.into()),
            Some(instance.into()),
            action.into(),
        )
    }

    /// Sets the payload (`query`) to a document.
    pub fn body(mut self, query: Document) -> Self {
        self.query = query;
        self
    }

    /// Sets the payload (`query`) from any serde value that encodes to a document.
    ///
    /// ```
    /// #[derive(serde::Serialize)]
    /// struct Reload { tenant: i32 }
    /// let m = intracom::Message::broadcast("reload").payload(&Reload { tenant: 7 })?;
    /// assert_eq!(m.query.get_i32("tenant")?, 7);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn payload<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Self> {
        self.query = to_document(value)?;
        Ok(self)
    }

    /// Sends on behalf of another service than the bus's own (for processes that host
    /// several services). The service must still be in the catalog.
    pub fn from_service(mut self, service: impl Into<String>) -> Self {
        self.source_service = service.into();
        self
    }

    /// Replaces the generated id, e.g. with an id derived from a business key so that
    /// publishing the same event twice stores it once.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Makes the message work for exactly one instance of its target service
    /// (`delivery: one`, `state: pending`): a worker claims it, and it is retried on
    /// failure (see [`crate::Intracom::work`]).
    ///
    /// ```
    /// let job = intracom::Message::to_service("billing", "invoice.render").work().priority(5);
    /// assert_eq!(job.delivery, intracom::DeliveryMode::One);
    /// ```
    pub fn work(mut self) -> Self {
        self.delivery = DeliveryMode::One;
        self.state = Some(State::Pending);
        self
    }

    /// Work-queue priority: higher is claimed first (default 0).
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Carries this trace context instead of the one a publish would store (the current
    /// span's, with the feature `otel`).
    pub fn with_trace(mut self, trace: TraceContext) -> Self {
        self.trace = Some(trace);
        self
    }

    /// Sets the message type (e.g. [`MessageType::Async`]).
    pub fn kind(mut self, kind: MessageType) -> Self {
        self.kind = kind;
        self
    }

    /// Decodes the payload into a typed value.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        Ok(bson::from_document(self.query.clone()).map_err(PayloadError::from)?)
    }

    /// Checks the fields a consumer relies on. The catalog checks come on top of this.
    pub fn validate(&self) -> Result<()> {
        check_name("id", &self.id)?;
        check_name("action", &self.action)?;
        check_name("serviceNameSource", &self.source_service)?;
        check_name("instanceSource", &self.source_instance)?;
        if let Some(dest) = &self.dest_service {
            check_name("serviceNameDest", dest)?;
        }
        if let Some(instance) = &self.dest_instance {
            check_name("instanceDest", instance)?;
            if self.dest_service.is_none() {
                return Err(Error::invalid(
                    "instanceDest is set but serviceNameDest is null",
                ));
            }
        }
        Ok(())
    }

    /// The encoded size of the message in bytes, as a medium would store it.
    ///
    /// Counted from the fields without encoding the message, except for the rare BSON
    /// values that are counted by encoding them (old binary, code with scope, regular
    /// expressions, DB pointers) and for a payload the encoder would refuse (a key with
    /// a NUL byte): then the error is the encoder's.
    pub fn encoded_len(&self) -> Result<usize> {
        match self.counted_len() {
            Some(len) => Ok(len),
            None => Ok(bson::to_vec(self).map_err(PayloadError::from)?.len()),
        }
    }

    /// The size `bson::to_vec(self)` would have, counted field by field in the order
    /// and with the omissions of the `Serialize` derive above; `None` when a value is
    /// left to the encoder (see [`Message::encoded_len`]).
    pub(crate) fn counted_len(&self) -> Option<usize> {
        fn string(value: &str) -> usize {
            4 + value.len() + 1
        }
        // An element: type byte, key as a C string, value.
        fn element(key: &str, value: usize) -> usize {
            1 + key.len() + 1 + value
        }
        let optional_string = |key: &str, value: &Option<String>| {
            value.as_deref().map_or(0, |v| element(key, string(v)))
        };
        let optional_document = |key: &str, value: &Option<Document>| -> Option<usize> {
            Some(match value {
                Some(doc) => element(key, document_len(doc)?),
                None => 0,
            })
        };
        let mut len = 4 + 1; // length prefix and terminating NUL
        len += element("_id", string(&self.id));
        len += self.ts.map_or(0, |_| element("ts", 8));
        len += self.at.map_or(0, |_| element("at", 8));
        len += element("serviceNameSource", string(&self.source_service));
        len += element("instanceSource", string(&self.source_instance));
        // Never omitted: `None` is stored as null (no value bytes).
        len += element(
            "serviceNameDest",
            self.dest_service.as_deref().map_or(0, string),
        );
        len += optional_string("instanceDest", &self.dest_instance);
        len += element("type", string(self.kind.as_str()));
        len += element("delivery", string(self.delivery.as_str()));
        len += element("action", string(&self.action));
        len += element("query", document_len(&self.query)?);
        len += optional_string("queryId", &self.query_id);
        len += self
            .state
            .map_or(0, |state| element("state", string(state.as_str())));
        len += optional_document("response", &self.response)?;
        len += optional_document("result", &self.result)?;
        len += element("query_ts", 8);
        len += self.response_ts.map_or(0, |_| element("response_ts", 8));
        len += self.query_ms.map_or(0, |_| element("query_ms", 8));
        len += element("priority", 4);
        if self.attempts != 0 {
            len += element("attempts", 4);
        }
        if let Some(lease) = &self.lease {
            let lease_len = 4
                + element("owner", string(&lease.owner))
                + element("at", 8)
                + element("ms", 8)
                + 1;
            len += element("lease", lease_len);
        }
        len += optional_string("lastError", &self.last_error);
        len += optional_string("retryOf", &self.retry_of);
        if let Some(trace) = &self.trace {
            let trace_len = 4
                + element("traceparent", string(&trace.traceparent))
                + optional_string("tracestate", &trace.tracestate)
                + 1;
            len += element("trace", trace_len);
        }
        Some(len)
    }
}

/// The encoded size of a BSON document, or `None` when it holds a value this does not
/// count (or that the encoder would refuse: a key with a NUL byte).
fn document_len(doc: &Document) -> Option<usize> {
    let mut len = 4 + 1;
    for (key, value) in doc {
        if key.as_bytes().contains(&0) {
            return None;
        }
        len += element_len(key.len(), value)?;
    }
    Some(len)
}

/// An element's size: type byte, key as a C string (`key_len` bytes and a NUL), value.
fn element_len(key_len: usize, value: &bson::Bson) -> Option<usize> {
    use bson::Bson;
    let value = match value {
        Bson::Double(_) | Bson::DateTime(_) | Bson::Timestamp(_) | Bson::Int64(_) => 8,
        Bson::Int32(_) => 4,
        Bson::Boolean(_) => 1,
        Bson::Null | Bson::Undefined | Bson::MaxKey | Bson::MinKey => 0,
        Bson::ObjectId(_) => 12,
        Bson::Decimal128(_) => 16,
        Bson::String(s) | Bson::Symbol(s) | Bson::JavaScriptCode(s) => 4 + s.len() + 1,
        Bson::Document(doc) => document_len(doc)?,
        Bson::Array(items) => {
            let mut len = 4 + 1;
            for (index, item) in items.iter().enumerate() {
                len += element_len(decimal_digits(index), item)?;
            }
            len
        }
        Bson::Binary(binary) if binary.subtype != bson::spec::BinarySubtype::BinaryOld => {
            4 + 1 + binary.bytes.len()
        }
        // Left to the encoder: rare, with rules of their own.
        Bson::Binary(_)
        | Bson::RegularExpression(_)
        | Bson::JavaScriptCodeWithScope(_)
        | Bson::DbPointer(_) => return None,
    };
    Some(1 + key_len + 1 + value)
}

impl Message {
    /// About how many bytes of memory the message takes as it is held, decoded (its
    /// strings, and each document entry with its map slot): what a medium that keeps
    /// messages as they are (memory) holds for it. Several times the encoded size for a
    /// payload of many small values (`[0, 0, …]`: 9 bytes encoded per value, about a
    /// hundred decoded).
    ///
    /// On the memory medium, the size held to `common.intracom.max_message_bytes` is
    /// the larger of this and [`Message::encoded_len`].
    pub fn kept_len(&self) -> usize {
        let strings = [
            Some(&self.id),
            Some(&self.source_service),
            Some(&self.action),
            self.dest_service.as_ref(),
            self.dest_instance.as_ref(),
            self.query_id.as_ref(),
            self.last_error.as_ref(),
            self.retry_of.as_ref(),
            self.trace.as_ref().map(|t| &t.traceparent),
            self.trace.as_ref().and_then(|t| t.tracestate.as_ref()),
        ];
        std::mem::size_of::<Message>()
            + self.source_instance.len()
            + strings.iter().flatten().map(|s| s.len()).sum::<usize>()
            + document_heap(&self.query)
            + self.response.as_ref().map_or(0, document_heap)
            + self.result.as_ref().map_or(0, document_heap)
    }
}

/// The heap a decoded document holds: per entry, its key, value and map slot (the
/// index map's entry and its index), and what its values hold in turn.
fn document_heap(doc: &Document) -> usize {
    const ENTRY: usize = std::mem::size_of::<bson::Bson>()
        + std::mem::size_of::<String>()
        + 2 * std::mem::size_of::<usize>();
    doc.iter()
        .map(|(key, value)| ENTRY + key.len() + value_heap(value))
        .sum()
}

fn value_heap(value: &bson::Bson) -> usize {
    use bson::Bson;
    match value {
        Bson::String(s) | Bson::Symbol(s) | Bson::JavaScriptCode(s) => s.len(),
        Bson::Document(doc) => document_heap(doc),
        Bson::Array(items) => items
            .iter()
            .map(|item| std::mem::size_of::<Bson>() + value_heap(item))
            .sum(),
        Bson::Binary(binary) => binary.bytes.len(),
        Bson::RegularExpression(regex) => regex.pattern.len() + regex.options.len(),
        Bson::JavaScriptCodeWithScope(code) => code.code.len() + document_heap(&code.scope),
        Bson::DbPointer(_) => 64,
        _ => 0,
    }
}

/// How many decimal digits `n` has (array keys are the indexes in decimal).
fn decimal_digits(n: usize) -> usize {
    n.checked_ilog10().map_or(1, |log| log as usize + 1)
}

/// Checks a service, instance, action or id name: non-empty, bounded, no whitespace,
/// no control character, no invisible or format character ([`is_invisible`]).
pub(crate) fn check_name(field: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(format!("`{field}` is empty")));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(Error::invalid(format!(
            "`{field}` is longer than {MAX_NAME_LEN} bytes"
        )));
    }
    // Names are mostly printable ASCII: checked byte by byte, the rest char by char.
    // The bytes are folded without stopping early, which the compiler turns into a
    // few vector instructions (`all` stops at the first miss: a loop per byte).
    if !value
        .bytes()
        .fold(true, |graphic, b| graphic & b.is_ascii_graphic())
    {
        if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(Error::invalid(format!(
                "`{field}` contains whitespace or control characters: {value:?}"
            )));
        }
        if let Some(c) = value.chars().find(|&c| is_invisible(c)) {
            return Err(Error::invalid(format!(
                "`{field}` contains an invisible or format character (U+{:04X}): {}",
                u32::from(c),
                value.escape_unicode()
            )));
        }
    }
    Ok(())
}

/// Characters that show nothing, or change how the text around them shows, without
/// being whitespace: Unicode's format characters (general category Cf: zero-width
/// space and joiners, bidirectional embeddings, overrides and isolates, the byte-order
/// mark, tags…), and the fillers and variation selectors that render as nothing. Two
/// names that differ only by these look the same to a person, so names refuse them.
pub(crate) fn is_invisible(c: char) -> bool {
    matches!(
        u32::from(c),
        // General category Cf (Unicode 16).
        0x00AD
            | 0x0600..=0x0605
            | 0x061C
            | 0x06DD
            | 0x070F
            | 0x0890..=0x0891
            | 0x08E2
            | 0x180E
            | 0x200B..=0x200F
            | 0x202A..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
            // Shown as nothing though not Cf: the combining grapheme joiner, the
            // Hangul and Khmer fillers, the variation selectors.
            | 0x034F
            | 0x115F..=0x1160
            | 0x17B4..=0x17B5
            | 0x180B..=0x180D
            | 0x180F
            | 0x3164
            | 0xFE00..=0xFE0F
            | 0xFFA0
            | 0xE0100..=0xE01EF
    )
}

/// Encodes a serde value as a BSON document (the payload form).
pub(crate) fn to_document<T: Serialize + ?Sized>(value: &T) -> Result<Document> {
    match bson::to_bson(value).map_err(PayloadError::from)? {
        bson::Bson::Document(doc) => Ok(doc),
        other => Err(PayloadError::NotADocument(format!("{:?}", other.element_type())).into()),
    }
}

/// A new client-side message id: a ULID (26 characters, Crockford base32), sortable by
/// creation time on one process and unique across processes by its 80 random bits.
pub fn new_id() -> String {
    static GENERATOR: Mutex<Option<ulid::Generator>> = Mutex::new(None);
    let mut guard = GENERATOR
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let generator = guard.get_or_insert_with(ulid::Generator::new);
    // The monotonic generator fails only when 2^80 ids were made in one millisecond;
    // a fresh random id is still unique then.
    generator
        .generate()
        .unwrap_or_else(|_| ulid::Ulid::new())
        .to_string()
}

/// Now, in nanoseconds since the Unix epoch (client clock, for `query_ts`).
pub(crate) fn now_nanos() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn every_counted_kind_of_value() -> Document {
        let many: Vec<bson::Bson> = (0..120).map(bson::Bson::Int32).collect();
        doc! {
            "double": 1.5,
            "string": "prix modifié ✓",
            "empty": "",
            "nested": { "a": { "b": [1_i64, "two", { "three": 3 }] } },
            "array": many,
            "bool": true,
            "null": bson::Bson::Null,
            "int32": 7,
            "int64": 7_i64,
            "date": bson::DateTime::from_millis(1_700_000_000_000),
            "timestamp": Timestamp { time: 5, increment: 6 },
            "oid": bson::oid::ObjectId::new(),
            "decimal": bson::Bson::Decimal128(bson::Decimal128::from_bytes([1; 16])),
            "binary": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![1, 2, 3] },
            "uuid": bson::Binary { subtype: bson::spec::BinarySubtype::Uuid, bytes: vec![9; 16] },
            "symbol": bson::Bson::Symbol("s".into()),
            "code": bson::Bson::JavaScriptCode("x => x".into()),
            "undefined": bson::Bson::Undefined,
            "max": bson::Bson::MaxKey,
            "min": bson::Bson::MinKey,
            "": "empty key",
        }
    }

    #[test]
    fn the_counted_size_is_the_encoded_size() {
        let plain = Message::broadcast("reload").body(doc! {"tenant": 7});
        let mut full = Message::to_instance("billing", "billing-1", "charge")
            .body(every_counted_kind_of_value())
            .priority(-3);
        full.ts = Some(Timestamp {
            time: 1,
            increment: 2,
        });
        full.at = Some(bson::DateTime::now());
        full.delivery = DeliveryMode::One;
        full.query_id = Some("q".into());
        full.state = Some(State::Error);
        full.response = Some(doc! {"error": "boom"});
        full.result = Some(every_counted_kind_of_value());
        full.response_ts = Some(1);
        full.query_ms = Some(2);
        full.attempts = 3;
        full.lease = Some(Lease {
            owner: "billing-2".into(),
            at: bson::DateTime::now(),
            ms: 30_000,
        });
        full.last_error = Some("the last one".into());
        full.retry_of = Some(new_id());
        full.trace = TraceContext::new(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("vendor=abc".into()),
        );
        let mut traced = Message::to_service("billing", "ping");
        traced.trace = TraceContext::new(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            None,
        );
        let mut empty_payload = Message::to_service("billing", "ping");
        empty_payload.state = Some(State::Pending);
        for message in [plain, full, empty_payload, traced] {
            let encoded = bson::to_vec(&message).unwrap().len();
            assert_eq!(message.counted_len(), Some(encoded), "{message:?}");
            assert_eq!(message.encoded_len().unwrap(), encoded);
        }
    }

    #[test]
    fn values_left_to_the_encoder_are_still_sized_or_refused() {
        let odd = [
            doc! {"regex": bson::Regex { pattern: "^a".into(), options: "i".into() }},
            doc! {"old": bson::Binary { subtype: bson::spec::BinarySubtype::BinaryOld, bytes: vec![1, 2] }},
            doc! {"scope": bson::JavaScriptCodeWithScope { code: "x".into(), scope: doc! {"x": 1} }},
        ];
        for payload in odd {
            let message = Message::broadcast("reload").body(payload);
            assert_eq!(message.counted_len(), None);
            assert_eq!(
                message.encoded_len().unwrap(),
                bson::to_vec(&message).unwrap().len()
            );
        }
        // The encoder refuses a key with a NUL byte: so does the size check.
        let mut nul = Document::new();
        nul.insert("a\0b", 1);
        let message = Message::broadcast("reload").body(doc! {"inner": nul});
        assert_eq!(message.counted_len(), None);
        assert!(message.encoded_len().is_err());
    }

    #[test]
    fn decimal_digits_of_array_indexes() {
        for (n, digits) in [(0, 1), (9, 1), (10, 2), (99, 2), (100, 3), (123_456, 6)] {
            assert_eq!(decimal_digits(n), digits, "{n}");
        }
    }

    #[test]
    fn ids_sort_in_creation_order_and_are_unique() {
        let ids: Vec<String> = (0..1000).map(|_| new_id()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, ids);
    }

    #[test]
    fn seed_field_names_are_used() {
        let mut m = Message::to_service("billing", "load").body(doc! {"a": 1});
        m.source_service = "users".into();
        m.source_instance = "users-1".into();
        let d = bson::to_document(&m).unwrap();
        for key in [
            "_id",
            "serviceNameSource",
            "instanceSource",
            "serviceNameDest",
            "type",
            "delivery",
            "action",
            "query",
            "query_ts",
        ] {
            assert!(d.contains_key(key), "missing {key} in {d}");
        }
        assert_eq!(d.get_str("type").unwrap(), "fire_and_forget");
        assert!(
            !d.contains_key("ts"),
            "an unpublished message carries no stamp"
        );
        let back: Message = bson::from_document(d).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn broadcast_stores_null_destination() {
        let d = bson::to_document(&Message::broadcast("reload")).unwrap();
        assert_eq!(d.get("serviceNameDest"), Some(&bson::Bson::Null));
    }

    #[test]
    fn validation_names_the_field() {
        let mut m = Message::broadcast("");
        m.source_service = "a".into();
        m.source_instance = "a-1".into();
        let err = m.validate().unwrap_err().to_string();
        assert!(err.contains("`action` is empty"), "{err}");
        let mut m = Message::to_service("svc", "has space");
        m.source_service = "a".into();
        m.source_instance = "a-1".into();
        assert!(m.validate().unwrap_err().to_string().contains("action"));
    }

    #[test]
    fn names_refuse_invisible_and_format_characters() {
        for c in [
            '\u{200B}',
            '\u{200C}',
            '\u{200D}',
            '\u{200E}',
            '\u{202E}',
            '\u{2066}',
            '\u{2069}',
            '\u{FEFF}',
            '\u{00AD}',
            '\u{2060}',
            '\u{E0041}',
            '\u{FE0F}',
            '\u{3164}',
        ] {
            let name = format!("bill{c}ing");
            let err = check_name("service", &name).unwrap_err().to_string();
            assert!(
                err.contains("invisible or format character")
                    && err.contains(&format!("U+{:04X}", u32::from(c))),
                "U+{:04X}: {err}",
                u32::from(c)
            );
        }
        // Look-alikes are names (the console shows their code points), and so are
        // scripts other than Latin.
        for name in [
            "bill\u{0456}ng",
            "caf\u{e9}",
            "\u{8a08}\u{7b97}",
            "a-b_c.d:e/f",
        ] {
            check_name("service", name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(check_name("service", "a\u{7f}").is_err());
        assert!(check_name("service", "a\u{85}b").is_err());
    }

    #[test]
    fn payload_must_be_a_document() {
        let err = Message::broadcast("x").payload(&5).unwrap_err();
        assert!(
            matches!(err, Error::Payload(PayloadError::NotADocument(_))),
            "{err}"
        );
    }

    #[test]
    fn typed_payload_round_trips() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Q {
            tenant: i64,
            name: String,
        }
        let q = Q {
            tenant: 7,
            name: "acme".into(),
        };
        let m = Message::broadcast("reload").payload(&q).unwrap();
        assert_eq!(m.decode::<Q>().unwrap(), q);
        assert!(m.decode::<Vec<String>>().is_err());
    }
}
