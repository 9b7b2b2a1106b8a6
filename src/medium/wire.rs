//! The JSON shapes of the gateway's medium routes (`/medium/...`), shared by the
//! gateway that serves them and the HTTP medium that calls them.
//!
//! Why it exists: a bus whose medium is a remote gateway (`common.intracom.medium=http`)
//! calls the operations of the gateway's own medium one by one. Documents, messages,
//! positions and stamps travel as canonical extended JSON, so that nothing is lost on
//! the way (an `Int64` stays one, a `Timestamp` stays one, a resume token's bytes stay
//! the same).

use bson::{Bson, Document, Timestamp};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::filter::{Filter, Position, StartFrom};
use crate::medium::{Capabilities, Reservation, Settlement};
use crate::message::{Message, MessageType};

/// A document as canonical extended JSON.
pub(crate) fn ext_of(document: &Document) -> serde_json::Value {
    Bson::Document(document.clone()).into_canonical_extjson()
}

/// A document read back from extended JSON (canonical or relaxed).
pub(crate) fn doc_of(value: serde_json::Value, what: &str) -> Result<Document> {
    match Bson::try_from(value) {
        Ok(Bson::Document(document)) => Ok(document),
        Ok(other) => Err(Error::InvalidMessage {
            reason: format!(
                "{what}: expected a document, got {:?}",
                other.element_type()
            ),
        }),
        Err(e) => Err(Error::InvalidMessage {
            reason: format!("{what}: not extended JSON: {e}"),
        }),
    }
}

/// A message as canonical extended JSON (its stored form).
pub(crate) fn ext_of_message(message: &Message) -> Result<serde_json::Value> {
    Ok(ext_of(&crate::message::to_document(message)?))
}

/// A message read back from extended JSON.
pub(crate) fn message_of(value: serde_json::Value) -> Result<Message> {
    let document = doc_of(value, "message")?;
    bson::from_document(document).map_err(|e| Error::InvalidMessage {
        reason: format!("message: {e}"),
    })
}

/// A position as canonical extended JSON (`{"ts": {"$timestamp": …}, "token": …}`).
pub(crate) fn ext_of_position(position: &Position) -> serde_json::Value {
    let mut document = bson::doc! { "ts": position.ts };
    if let Some(token) = &position.token {
        document.insert("token", token.clone());
    }
    ext_of(&document)
}

/// A position read back from extended JSON.
pub(crate) fn position_of(value: serde_json::Value) -> Result<Position> {
    let document = doc_of(value, "position")?;
    let ts = document
        .get_timestamp("ts")
        .map_err(|e| Error::InvalidMessage {
            reason: format!("position: `ts` must be a timestamp: {e}"),
        })?;
    let token = match document.get("token") {
        None | Some(Bson::Null) => None,
        Some(Bson::Document(token)) => Some(token.clone()),
        Some(_) => {
            return Err(Error::InvalidMessage {
                reason: "position: `token` must be a document".into(),
            })
        }
    };
    Ok(Position::new(ts, token))
}

/// A stamp as canonical extended JSON.
pub(crate) fn ext_of_ts(ts: Timestamp) -> serde_json::Value {
    Bson::Timestamp(ts).into_canonical_extjson()
}

/// A stamp read back from extended JSON.
pub(crate) fn ts_of(value: serde_json::Value) -> Result<Timestamp> {
    match Bson::try_from(value) {
        Ok(Bson::Timestamp(ts)) => Ok(ts),
        _ => Err(Error::InvalidMessage {
            reason: "expected a timestamp as extended JSON".into(),
        }),
    }
}

/// What the gateway's medium is and does (`GET /medium`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct MediumInfo {
    /// The gateway's medium (`memory`, `db`, `mqtt`).
    pub medium: String,
    /// The largest message it accepts, in bytes (and the largest request body the
    /// gateway reads, when that is smaller).
    pub max_message_bytes: u64,
    /// The promises it keeps.
    pub capabilities: CapabilitiesJson,
    /// Whether it carries work claimed from a stored queue (the medium routes carry no
    /// work pushed to workers).
    pub work: bool,
    /// Whether it keeps dead letters.
    pub dead_letters: bool,
    /// Whether it keeps idempotency records.
    pub records: bool,
    /// Whether it answers an operator's inspections.
    pub inspection: bool,
    /// Whether a follower from now receives an `anchor` event first (a gateway
    /// without it sends none).
    #[serde(default)]
    pub anchors: bool,
}

/// [`Capabilities`] as JSON.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct CapabilitiesJson {
    pub server_stamps: bool,
    pub history: bool,
    pub loss_reports: bool,
    pub shared_checkpoints: bool,
    pub stored_queue: bool,
    pub shared_state: bool,
}

impl From<Capabilities> for CapabilitiesJson {
    fn from(c: Capabilities) -> Self {
        CapabilitiesJson {
            server_stamps: c.server_stamps,
            history: c.history,
            loss_reports: c.loss_reports,
            shared_checkpoints: c.shared_checkpoints,
            stored_queue: c.stored_queue,
            shared_state: c.shared_state,
        }
    }
}

impl From<CapabilitiesJson> for Capabilities {
    fn from(c: CapabilitiesJson) -> Self {
        Capabilities {
            server_stamps: c.server_stamps,
            history: c.history,
            loss_reports: c.loss_reports,
            shared_checkpoints: c.shared_checkpoints,
            stored_queue: c.stored_queue,
            shared_state: c.shared_state,
        }
    }
}

/// Messages to append (`POST /medium/append`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct AppendJson {
    /// The messages, each as extended JSON, in order.
    #[cfg_attr(feature = "gateway", schema(value_type = Vec<Object>))]
    pub messages: Vec<serde_json::Value>,
}

/// The outcome of appending one message.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct AppendedJson {
    /// The message id.
    pub id: String,
    /// The stamp the medium gave it, as extended JSON (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "gateway", schema(value_type = Option<Object>))]
    pub ts: Option<serde_json::Value>,
    /// True when the id was stored already.
    pub duplicate: bool,
}

/// Where a follower starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub(crate) enum FromJson {
    /// After what exists now.
    #[default]
    Now,
    /// The oldest message retained.
    Beginning,
    /// After `position`.
    After,
}

/// [`Filter`] as JSON.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct FilterJson {
    /// The receiving service; absent for a monitor (admin tokens only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The receiving instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Only these actions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actions: Option<Vec<String>>,
    /// Only from these services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<Vec<String>>,
    /// Only these types.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub types: Option<Vec<MessageType>>,
    /// Skip what this instance sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_instance: Option<String>,
    /// Work (`delivery: one`) of `service` instead of messages.
    #[serde(default)]
    pub work: bool,
}

impl From<&Filter> for FilterJson {
    fn from(f: &Filter) -> Self {
        FilterJson {
            service: f.service.clone(),
            instance: f.instance.clone(),
            actions: f.actions.as_ref().map(|s| s.iter().cloned().collect()),
            sources: f.sources.as_ref().map(|s| s.iter().cloned().collect()),
            types: f.types.as_ref().map(|s| s.iter().copied().collect()),
            exclude_instance: f.exclude_instance.clone(),
            work: f.work,
        }
    }
}

impl From<FilterJson> for Filter {
    fn from(f: FilterJson) -> Self {
        Filter {
            service: f.service,
            instance: f.instance,
            actions: f.actions.map(|v| v.into_iter().collect()),
            sources: f.sources.map(|v| v.into_iter().collect()),
            types: f.types.map(|v| v.into_iter().collect()),
            exclude_instance: f.exclude_instance,
            work: f.work,
        }
    }
}

/// What to follow (`POST /medium/follow`): the answer is an event stream whose
/// `message` events carry the message and its position (also the event's id), `lost`
/// events the count of messages that expired before they were read, `error` events an
/// error of the medium.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct FollowJson {
    /// Where to start.
    #[serde(default)]
    pub from: FromJson,
    /// With `from: after`: the position, as extended JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "gateway", schema(value_type = Option<Object>))]
    pub position: Option<serde_json::Value>,
    /// Which messages.
    #[serde(default)]
    pub filter: FilterJson,
    /// A named (durable) subscription's name, for a medium that keeps the consumer's
    /// place itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl FollowJson {
    pub(crate) fn new(from: &StartFrom, filter: &Filter, name: Option<&str>) -> Self {
        let (from, position) = match from {
            StartFrom::Now => (FromJson::Now, None),
            StartFrom::Beginning => (FromJson::Beginning, None),
            StartFrom::After(position) => (FromJson::After, Some(ext_of_position(position))),
        };
        FollowJson {
            from,
            position,
            filter: filter.into(),
            name: name.map(str::to_string),
        }
    }

    /// The start point.
    pub(crate) fn start(&mut self) -> Result<StartFrom> {
        Ok(match self.from {
            FromJson::Now => StartFrom::Now,
            FromJson::Beginning => StartFrom::Beginning,
            FromJson::After => match self.position.take() {
                Some(position) => StartFrom::After(position_of(position)?),
                None => {
                    return Err(Error::InvalidMessage {
                        reason: "`from: after` needs a `position`".into(),
                    })
                }
            },
        })
    }
}

/// The data of a follower's `message` event.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct FollowedJson {
    /// The message, as extended JSON.
    #[cfg_attr(feature = "gateway", schema(value_type = Object))]
    pub message: serde_json::Value,
    /// The position just after it, as extended JSON.
    #[cfg_attr(feature = "gateway", schema(value_type = Object))]
    pub position: serde_json::Value,
}

/// The data of a follower's `anchor` event: the first event of a follower from now,
/// where it resumes when its stream breaks before it has read a message (`null`: the
/// gateway's medium cannot name that place, and such a follower opens again from now).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct AnchorJson {
    /// The position, as extended JSON.
    #[cfg_attr(feature = "gateway", schema(value_type = Option<Object>))]
    pub position: Option<serde_json::Value>,
}

/// The data of a follower's `lost` event.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct LostJson {
    /// How many (0 when the medium cannot count them).
    pub count: u64,
}

/// A service and actions to add to the catalog (`POST /medium/catalog`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct CatalogAddJson {
    /// The service.
    pub service: String,
    /// Its actions.
    pub actions: Vec<String>,
}

/// A named subscription's checkpoint (`POST /medium/checkpoint/load`, `.../save`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct CheckpointJson {
    /// The subscription's name.
    pub name: String,
    /// The position, as extended JSON (absent: none saved, for a load).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "gateway", schema(value_type = Option<Object>))]
    pub position: Option<serde_json::Value>,
}

/// A claim (`POST /medium/work/claim`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct ClaimJson {
    /// The service whose work is claimed.
    pub service: String,
    /// Only these actions.
    pub actions: Vec<String>,
    /// The claiming worker.
    pub owner: String,
    /// The lease, in ms.
    pub lease_ms: u64,
}

/// A message or nothing (`claim`, `outcome`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct MaybeMessageJson {
    /// The message as extended JSON; absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "gateway", schema(value_type = Option<Object>))]
    pub message: Option<serde_json::Value>,
}

/// A lease to renew (`POST /medium/work/renew`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct RenewJson {
    /// The work's id.
    pub id: String,
    /// Its holder.
    pub owner: String,
    /// The new lease, in ms.
    pub lease_ms: u64,
}

/// How claimed work ends.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub(crate) enum SettlementJson {
    /// Done, with an optional result (extended JSON).
    Done {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[cfg_attr(feature = "gateway", schema(value_type = Option<Object>))]
        result: Option<serde_json::Value>,
    },
    /// Failed for good, with the error document (extended JSON).
    Failed {
        #[cfg_attr(feature = "gateway", schema(value_type = Object))]
        response: serde_json::Value,
    },
    /// To be tried again after `after_ms`.
    Retry { error: String, after_ms: u64 },
}

impl From<&Settlement> for SettlementJson {
    fn from(s: &Settlement) -> Self {
        match s {
            Settlement::Done(result) => SettlementJson::Done {
                result: result.as_ref().map(ext_of),
            },
            Settlement::Failed(response) => SettlementJson::Failed {
                response: ext_of(response),
            },
            Settlement::Retry { error, after } => SettlementJson::Retry {
                error: error.clone(),
                after_ms: u64::try_from(after.as_millis()).unwrap_or(u64::MAX),
            },
        }
    }
}

impl SettlementJson {
    pub(crate) fn into_settlement(self) -> Result<Settlement> {
        Ok(match self {
            SettlementJson::Done { result } => {
                Settlement::Done(result.map(|r| doc_of(r, "result")).transpose()?)
            }
            SettlementJson::Failed { response } => {
                Settlement::Failed(doc_of(response, "response")?)
            }
            SettlementJson::Retry { error, after_ms } => Settlement::Retry {
                error,
                after: std::time::Duration::from_millis(after_ms),
            },
        })
    }
}

/// A settlement (`POST /medium/work/settle`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct SettleJson {
    /// The work's id.
    pub id: String,
    /// Its holder; absent: only while the work is still pending (a caller's time-out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// How it ends.
    pub settlement: SettlementJson,
}

/// A burial (`POST /medium/work/bury`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct BuryJson {
    /// The work's id.
    pub id: String,
    /// Its holder.
    pub owner: String,
    /// Why.
    pub reason: String,
}

/// A wait for a request's outcome (`POST /medium/work/outcome`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct OutcomeJson {
    /// The request's id.
    pub id: String,
    /// How long to wait, in ms (the gateway waits at most its `max_request_timeout`).
    pub timeout_ms: u64,
}

/// Whether a conditional operation took effect.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct DoneJson {
    /// True when it did.
    pub done: bool,
}

/// How many were removed or purged.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct CountJson {
    /// How many.
    pub count: u64,
}

/// A dead letter (`POST /medium/dead`, and as listed).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct DeadJson {
    /// The original message's id (ignored when writing one: it is the document's).
    #[serde(default)]
    pub id: String,
    /// The original document, as extended JSON.
    #[cfg_attr(feature = "gateway", schema(value_type = Object))]
    pub document: serde_json::Value,
    /// Why it is dead.
    pub reason: String,
    /// When it was dead-lettered, as extended JSON (a date).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "gateway", schema(value_type = Option<Object>))]
    pub at: Option<serde_json::Value>,
}

/// One id, or every one (`POST /medium/dead/get`, `.../remove`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct IdJson {
    /// The id; absent: all (for a removal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// How many dead letters to list (`POST /medium/dead/list`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct LimitJson {
    /// At most this many, oldest first (1 to 10 000).
    pub limit: u64,
}

/// An idempotency record's key and holder (`/medium/records/...`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct RecordJson {
    /// The consumer.
    pub consumer: String,
    /// The message id.
    pub id: String,
    /// The holder (reserve, complete, release).
    #[serde(default)]
    pub owner: String,
    /// The lease, in ms (reserve).
    #[serde(default)]
    pub lease_ms: u64,
    /// The handler's result, as extended JSON (complete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "gateway", schema(value_type = Option<Object>))]
    pub result: Option<serde_json::Value>,
}

/// The state of a record after a reservation.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub(crate) enum ReservationJson {
    /// The caller holds it.
    Reserved,
    /// Done, with the recorded result (extended JSON).
    Done {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[cfg_attr(feature = "gateway", schema(value_type = Option<Object>))]
        result: Option<serde_json::Value>,
    },
    /// Another holder runs the handler now.
    Busy,
}

impl From<&Reservation> for ReservationJson {
    fn from(r: &Reservation) -> Self {
        match r {
            Reservation::Reserved => ReservationJson::Reserved,
            Reservation::Done(result) => ReservationJson::Done {
                result: result.as_ref().map(ext_of),
            },
            Reservation::Busy => ReservationJson::Busy,
        }
    }
}

impl ReservationJson {
    pub(crate) fn into_reservation(self) -> Result<Reservation> {
        Ok(match self {
            ReservationJson::Reserved => Reservation::Reserved,
            ReservationJson::Done { result } => {
                Reservation::Done(result.map(|r| doc_of(r, "result")).transpose()?)
            }
            ReservationJson::Busy => Reservation::Busy,
        })
    }
}

/// An idempotency record as an operator reads it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct ProcessedJson {
    /// The consumer.
    pub consumer: String,
    /// The message id.
    pub id: String,
    /// Whether the handler succeeded.
    pub done: bool,
    /// Its result, as extended JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "gateway", schema(value_type = Option<Object>))]
    pub result: Option<serde_json::Value>,
    /// When it was reserved or done, as extended JSON (a date).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "gateway", schema(value_type = Option<Object>))]
    pub at: Option<serde_json::Value>,
}

/// An optional idempotency record.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct MaybeProcessedJson {
    /// The record; absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<ProcessedJson>,
}

/// A queue of one service's action (`POST /medium/queues/purge`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct QueueKeyJson {
    /// The service.
    pub service: String,
    /// The action.
    pub action: String,
}

/// A queue's counts.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct QueueJson {
    pub service: String,
    pub action: String,
    pub depth: u64,
    pub in_flight: u64,
    pub dead: u64,
}

/// A count of one key.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct KeyCountJson {
    pub key: String,
    pub count: u64,
}

/// A named subscription's lag.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct LagJson {
    pub subscription: String,
    pub messages: u64,
    pub seconds: u64,
}

/// The medium's counts (`POST /medium/inspection/stats`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
pub(crate) struct StatsJson {
    pub total: u64,
    pub by_service: Vec<KeyCountJson>,
    pub by_action: Vec<KeyCountJson>,
    pub by_type: Vec<KeyCountJson>,
    pub by_state: Vec<KeyCountJson>,
    pub queue_depth: u64,
    pub dead: u64,
    pub lag: Vec<LagJson>,
}

fn counts_of(counts: &[crate::medium::Count]) -> Vec<KeyCountJson> {
    counts
        .iter()
        .map(|c| KeyCountJson {
            key: c.key.clone(),
            count: c.count,
        })
        .collect()
}

fn counts_from(counts: Vec<KeyCountJson>) -> Vec<crate::medium::Count> {
    counts
        .into_iter()
        .map(|c| crate::medium::Count::new(c.key, c.count))
        .collect()
}

impl From<&crate::medium::Stats> for StatsJson {
    fn from(s: &crate::medium::Stats) -> Self {
        StatsJson {
            total: s.total,
            by_service: counts_of(&s.by_service),
            by_action: counts_of(&s.by_action),
            by_type: counts_of(&s.by_type),
            by_state: counts_of(&s.by_state),
            queue_depth: s.queue_depth,
            dead: s.dead,
            lag: s
                .lag
                .iter()
                .map(|l| LagJson {
                    subscription: l.subscription.clone(),
                    messages: l.messages,
                    seconds: l.seconds,
                })
                .collect(),
        }
    }
}

impl From<StatsJson> for crate::medium::Stats {
    fn from(s: StatsJson) -> Self {
        crate::medium::Stats {
            total: s.total,
            by_service: counts_from(s.by_service),
            by_action: counts_from(s.by_action),
            by_type: counts_from(s.by_type),
            by_state: counts_from(s.by_state),
            queue_depth: s.queue_depth,
            dead: s.dead,
            lag: s
                .lag
                .into_iter()
                .map(|l| crate::medium::Lag::new(l.subscription, l.messages, l.seconds))
                .collect(),
        }
    }
}

/// A date as canonical extended JSON.
pub(crate) fn ext_of_date(at: bson::DateTime) -> serde_json::Value {
    Bson::DateTime(at).into_canonical_extjson()
}

/// A date read back from extended JSON (`None` when it is not one).
pub(crate) fn date_of(value: serde_json::Value) -> Option<bson::DateTime> {
    match Bson::try_from(value) {
        Ok(Bson::DateTime(at)) => Some(at),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Types extended JSON keeps and plain JSON would lose come back as they went.
    #[test]
    fn documents_messages_and_positions_round_trip() {
        let document = bson::doc! {
            "long": 7_i64, "int": 7_i32, "double": 7.0, "ts": Timestamp { time: 3, increment: 4 },
            "bin": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![0, 1, 255] },
            "at": bson::DateTime::from_millis(1_700_000_000_123),
        };
        let json = serde_json::to_string(&ext_of(&document)).expect("json");
        let back = doc_of(serde_json::from_str(&json).expect("value"), "test").expect("document");
        assert_eq!(back, document);

        let position = Position::new(
            Timestamp {
                time: 9,
                increment: 1,
            },
            Some(bson::doc! { "_data": "8263A1", "seq": 5_i64 }),
        );
        assert_eq!(
            position_of(ext_of_position(&position)).expect("position"),
            position
        );

        let mut message = Message::to_service("billing", "invoice.created")
            .body(bson::doc! { "n": 1_i64 })
            .from_service("users");
        message.ts = Some(Timestamp {
            time: 1,
            increment: 2,
        });
        message.at = Some(bson::DateTime::from_millis(5));
        let back = message_of(ext_of_message(&message).expect("ext")).expect("message");
        assert_eq!(back, message);
    }
}
