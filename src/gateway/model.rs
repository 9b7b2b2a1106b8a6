//! The JSON shapes the gateway reads and writes, shared by several routes.
//!
//! Why it exists: one definition of "a message as JSON", "a stamp", "a receipt" for
//! every route and for the OpenAPI document, which is generated from these types. A
//! message keeps the field names of the Intracom message format (`serviceNameSource`, `serviceNameDest`,
//! `type`, `action`, `query`, `queryId`, `state`…) so that it reads the same in mongosh,
//! in `intracom tail --json` and over HTTP. Payloads are JSON objects; MongoDB's
//! extended JSON (`{"$date": …}`, `{"$numberLong": …}`) is accepted on the way in and
//! written in its relaxed form on the way out.

use bson::{Bson, Document, Timestamp};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult};
use crate::bus::{PublishStatus, Published};
use crate::message::{DeliveryMode, Message, MessageType, State};

/// A BSON Timestamp: the medium's order stamp of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Stamp {
    /// Seconds since the Unix epoch.
    pub t: u32,
    /// Order within the second.
    pub i: u32,
}

impl From<Timestamp> for Stamp {
    fn from(ts: Timestamp) -> Self {
        Stamp {
            t: ts.time,
            i: ts.increment,
        }
    }
}

/// A message as the gateway shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MessageJson {
    /// The message id (a ULID unless the sender chose one).
    pub id: String,
    /// The medium's order stamp; absent until published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<Stamp>,
    /// The medium's wall time at publish, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// The sending service.
    #[serde(rename = "serviceNameSource")]
    pub source_service: String,
    /// The sending instance.
    #[serde(rename = "instanceSource")]
    pub source_instance: String,
    /// The target service; null: every service.
    #[serde(rename = "serviceNameDest")]
    pub dest_service: Option<String>,
    /// The target instance, when the message is for one instance.
    #[serde(
        rename = "instanceDest",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub dest_instance: Option<String>,
    /// The exchange: `broadcast`, `fire_and_forget`, `async`, `sync`, `response`.
    #[serde(rename = "type")]
    pub kind: MessageType,
    /// `all` (every instance) or `one` (work: one instance).
    pub delivery: String,
    /// The action.
    pub action: String,
    /// The payload.
    #[schema(value_type = Object)]
    pub query: serde_json::Value,
    /// The correlation id of a request.
    #[serde(rename = "queryId", default, skip_serializing_if = "Option::is_none")]
    pub query_id: Option<String>,
    /// Request or work state: `pending`, `done`, `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<State>,
    /// The answer of a settled request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
    /// The error of a failed request or work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub response: Option<serde_json::Value>,
    /// Work priority (higher first).
    pub priority: i32,
    /// Claims of this work so far.
    pub attempts: i32,
    /// The error of the last failed attempt.
    #[serde(rename = "lastError", default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// For a message sent again from the dead letters: the original's id.
    #[serde(rename = "retryOf", default, skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<String>,
    /// Creation time on the sender, ns since the epoch (informative).
    pub query_ts: i64,
}

/// A document as relaxed extended JSON.
pub(crate) fn json_of(document: &Document) -> serde_json::Value {
    Bson::Document(document.clone()).into_relaxed_extjson()
}

/// An RFC 3339 time.
pub(crate) fn rfc3339(at: bson::DateTime) -> String {
    at.try_to_rfc3339_string()
        .unwrap_or_else(|_| at.timestamp_millis().to_string())
}

impl From<&Message> for MessageJson {
    fn from(m: &Message) -> Self {
        MessageJson {
            id: m.id.clone(),
            ts: m.ts.map(Stamp::from),
            at: m.at.map(rfc3339),
            source_service: m.source_service.clone(),
            source_instance: m.source_instance.clone(),
            dest_service: m.dest_service.clone(),
            dest_instance: m.dest_instance.clone(),
            kind: m.kind,
            delivery: match m.delivery {
                DeliveryMode::One => "one".into(),
                DeliveryMode::All => "all".into(),
            },
            action: m.action.clone(),
            query: json_of(&m.query),
            query_id: m.query_id.clone(),
            state: m.state,
            result: m.result.as_ref().map(json_of),
            response: m.response.as_ref().map(json_of),
            priority: m.priority,
            attempts: m.attempts,
            last_error: m.last_error.clone(),
            retry_of: m.retry_of.clone(),
            query_ts: m.query_ts,
        }
    }
}

/// A JSON object (extended JSON accepted) as a BSON document; `what` names it in the
/// error.
pub(crate) fn document_of(value: serde_json::Value, what: &str) -> ApiResult<Document> {
    match Bson::try_from(value) {
        Ok(Bson::Document(document)) => Ok(document),
        Ok(other) => Err(ApiError::BadRequest(format!(
            "`{what}` must be a JSON object, not {:?}",
            other.element_type()
        ))),
        Err(e) => Err(ApiError::BadRequest(format!(
            "`{what}` is not valid extended JSON: {e}"
        ))),
    }
}

/// What became of a published message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptStatus {
    /// Written to the medium now.
    Stored,
    /// A message with this id was stored before (a retried POST): nothing new was written.
    Duplicate,
    /// The medium is unavailable: the message waits in the outbox (`GET /messages`) and
    /// is sent, in order, when the medium is back.
    Buffered,
}

/// The receipt of a publish.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Receipt {
    /// The message id.
    pub id: String,
    /// Stored, duplicate or buffered.
    pub status: ReceiptStatus,
    /// The medium's stamp, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<Stamp>,
    /// For a dead letter sent again: the id of the original.
    #[serde(rename = "retryOf", default, skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<String>,
}

impl From<Published> for Receipt {
    fn from(p: Published) -> Self {
        Receipt {
            id: p.id,
            status: match p.status {
                PublishStatus::Stored => ReceiptStatus::Stored,
                PublishStatus::Duplicate => ReceiptStatus::Duplicate,
                PublishStatus::Buffered => ReceiptStatus::Buffered,
            },
            ts: p.ts.map(Stamp::from),
            retry_of: None,
        }
    }
}

impl Receipt {
    /// The HTTP status of a publish with this outcome: 201 stored, 200 duplicate,
    /// 202 buffered.
    pub(crate) fn status_code(&self) -> axum::http::StatusCode {
        use axum::http::StatusCode;
        match self.status {
            ReceiptStatus::Stored => StatusCode::CREATED,
            ReceiptStatus::Duplicate => StatusCode::OK,
            ReceiptStatus::Buffered => StatusCode::ACCEPTED,
        }
    }
}

/// How many things an operation removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Removed {
    /// How many.
    pub removed: u64,
}

/// A name (service, action, instance, consumer, message id) in the OpenAPI document:
/// what [`check_name`](crate::message::check_name) accepts, 1 to
/// [`MAX_NAME_LEN`](crate::message::MAX_NAME_LEN) bytes with no whitespace and no
/// control character. Only a schema: the fields stay `String`s.
pub(crate) struct Name;

impl utoipa::PartialSchema for Name {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(crate::message::MAX_NAME_LEN))
            .pattern(Some(r"^[^\s\x00-\x1f\x7f-\x9f]+$"))
            .description(Some("A name: no whitespace, no control character"))
            .into()
    }
}

impl utoipa::ToSchema for Name {}
