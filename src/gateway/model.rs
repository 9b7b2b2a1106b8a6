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
use crate::trace::TraceContext;

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
    /// The publisher's W3C trace context (`traceparent`, `tracestate`), when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceContext>,
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
            trace: m.trace.clone(),
        }
    }
}

/// A JSON object (extended JSON accepted) as a BSON document; `what` names it in the
/// error.
pub(crate) fn document_of(value: serde_json::Value, what: &str) -> ApiResult<Document> {
    // An integer above i64::MAX that serde_json kept as a u64 would become a float
    // (see check_integer_literals, which refuses it in request bodies before this).
    if let Some(n) = first_unsigned_beyond_i64(&value) {
        return Err(ApiError::BadRequest(format!(
            "`{what}` holds the integer {n}, above {} (the largest integer BSON stores): send \
             it as a string, or as a float if a float is meant",
            i64::MAX
        )));
    }
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

/// Refuses a JSON text holding an integer literal (digits without a fraction or an
/// exponent) outside the signed 64-bit range, the widest integer BSON has. serde_json
/// reads such a literal as a float (above `u64::MAX`) or as an unsigned integer that
/// the BSON conversion turns into a float: either way the number stored would not be
/// the number sent. A number written with a fraction or an exponent (`1.5`, `1e30`) is
/// a float by its writer's choice and stays one. Reads the text once, without
/// allocating; a text that is not JSON is left to the parser's own error.
pub(crate) fn check_integer_literals(text: &[u8]) -> ApiResult<()> {
    let mut i = 0;
    let mut in_string = false;
    while i < text.len() {
        let b = text[i];
        if in_string {
            match b {
                b'\\' => i += 2,
                b'"' => {
                    in_string = false;
                    i += 1;
                }
                _ => i += 1,
            }
            continue;
        }
        match b {
            b'"' => {
                in_string = true;
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                let negative = b == b'-';
                if negative {
                    i += 1;
                }
                let digits = i;
                while i < text.len() && text[i].is_ascii_digit() {
                    i += 1;
                }
                let integer = &text[digits..i];
                let is_float = i < text.len() && matches!(text[i], b'.' | b'e' | b'E');
                // Skip the rest of the number (fraction, exponent) in any case.
                while i < text.len()
                    && matches!(text[i], b'.' | b'e' | b'E' | b'+' | b'-' | b'0'..=b'9')
                {
                    i += 1;
                }
                if !is_float && !integer.is_empty() && !fits_i64(integer, negative) {
                    let literal = String::from_utf8_lossy(&text[start..i]);
                    let shown: String = literal.chars().take(40).collect();
                    let more = if literal.len() > shown.len() {
                        "…"
                    } else {
                        ""
                    };
                    return Err(ApiError::BadRequest(format!(
                        "the integer {shown}{more} is outside the 64-bit range that BSON stores \
                         ({} to {}): send it as a string, or as a float (`{shown}.0` or with an \
                         exponent) if a float is meant",
                        i64::MIN,
                        i64::MAX
                    )));
                }
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// Whether the decimal digits `digits` (with a minus sign before them if `negative`)
/// are an `i64`.
fn fits_i64(digits: &[u8], negative: bool) -> bool {
    let significant = digits
        .iter()
        .position(|&d| d != b'0')
        .map_or(&digits[digits.len()..], |first| &digits[first..]);
    // i64::MAX is 9223372036854775807 (19 digits); -i64::MIN one more.
    const MAX: &[u8] = b"9223372036854775807";
    const MIN: &[u8] = b"9223372036854775808";
    let limit = if negative { MIN } else { MAX };
    match significant.len().cmp(&limit.len()) {
        std::cmp::Ordering::Less => true,
        std::cmp::Ordering::Greater => false,
        std::cmp::Ordering::Equal => significant <= limit,
    }
}

/// The first number of `value` that serde_json holds as a `u64` above `i64::MAX`.
fn first_unsigned_beyond_i64(value: &serde_json::Value) -> Option<u64> {
    use serde_json::Value;
    let mut stack = vec![value];
    while let Some(value) = stack.pop() {
        match value {
            Value::Number(n) if n.is_u64() && !n.is_i64() => return n.as_u64(),
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => stack.extend(map.values()),
            _ => {}
        }
    }
    None
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
/// [`MAX_NAME_LEN`](crate::message::MAX_NAME_LEN) bytes with no whitespace, no
/// control character and no invisible or format character. Only a schema: the fields stay `String`s.
pub(crate) struct Name;

impl utoipa::PartialSchema for Name {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(crate::message::MAX_NAME_LEN))
            .pattern(Some(concat!(
                r"^[^\s\x00-\x1f\x7f-\x9f",
                // Invisible and format characters (message::is_invisible; those of the
                // basic plane: a pattern without the `u` flag cannot name the others).
                r"\u00ad\u034f\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u115f\u1160",
                r"\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u2064",
                r"\u2066-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff9-\ufffb]+$"
            )))
            .description(Some(
                "A name: no whitespace, no control character, no invisible or format character \
                 (zero-width, bidirectional, byte-order mark, variation selectors…)",
            ))
            .into()
    }
}

impl utoipa::ToSchema for Name {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_beyond_i64_are_refused_floats_stay_floats() {
        for text in [
            r#"{"a": 18446744073709551615}"#,
            r#"{"a": 9223372036854775808}"#,
            r#"{"a": -9223372036854775809}"#,
            r#"{"a": [1, 1000000000000000000000000000000]}"#,
            r#"{"a": {"b": 00000000000000000000099999999999999999999}}"#,
        ] {
            let err = check_integer_literals(text.as_bytes()).unwrap_err();
            assert!(
                matches!(err, ApiError::BadRequest(ref m) if m.contains("64-bit")),
                "{text}: {err}"
            );
        }
        for text in [
            r#"{"a": 9223372036854775807, "b": -9223372036854775808, "c": 0, "d": -0}"#,
            r#"{"a": 1e30, "b": 1.0e400, "c": 18446744073709551615.0, "d": 2E+5, "e": -1.5}"#,
            r#"{"99999999999999999999": "99999999999999999999 \" 99999999999999999999"}"#,
        ] {
            check_integer_literals(text.as_bytes()).unwrap_or_else(|e| panic!("{text}: {e}"));
        }
        // What serde_json does with them, which is why they are refused: a float.
        let value: serde_json::Value =
            serde_json::from_str(r#"{"a": 1000000000000000000000000000000}"#).unwrap();
        assert!(value["a"].is_f64());
        let value: serde_json::Value =
            serde_json::from_str(r#"{"a": 18446744073709551615}"#).unwrap();
        assert!(document_of(value, "query").is_err(), "u64 beyond i64");
        let value: serde_json::Value = serde_json::from_str(r#"{"a": 1e30}"#).unwrap();
        assert_eq!(
            document_of(value, "query").unwrap().get_f64("a").unwrap(),
            1e30
        );
    }
}
