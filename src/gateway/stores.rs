//! The two stores as REST resources: the MessageStore (`/messages`: messages not
//! routed yet) over the outbox, and the IdempotencyStore (`/idempotency`) over the
//! idempotency records. Admin tokens only.
//!
//! Why it exists: both stores are wanted as services with a REST API, so that
//! every client of the bus sees one source of truth. In intracom they already exist
//! inside the bus: the outbox keeps, in order, what the medium could not take yet and
//! sends it when the medium is back; the `processed` records say which consumer
//! handled which message, with its result. These routes show and edit them:
//!
//! - `POST /messages` keeps a message (checked like a publish) in the outbox of this
//!   gateway, which sends it as soon as the medium takes it; `GET /messages` lists what
//!   waits; `DELETE /messages/{messageId}` takes one out before it is sent (409 while
//!   the outbox is handing it to the medium: it cannot be taken back then).
//! - `POST /idempotency` marks a message processed by a consumer (with an optional
//!   result); `GET /idempotency/{messageId}?consumer=` tells whether it was;
//!   `DELETE /idempotency/{messageId}?consumer=` forgets it, so the message would be
//!   handled again. Records expire after `common.intracom.timeout_ms`.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Admin;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{Json, Path, Query};
use super::model::{document_of, json_of, rfc3339, MessageJson, Name, Receipt, Removed};
use super::publish::{idempotency_id, trace_of, PublishRequest};
use super::AppState;
use crate::medium::{ProcessedRecord, Reservation};
use crate::message::check_name;
use crate::OutboxRemoval;

/// Keeps a message in this gateway's outbox (the MessageStore): it is checked as a
/// publish is (catalog, size), then sent after what already waits there as soon as the
/// medium takes it. `from` names the sending service.
#[utoipa::path(
    post,
    path = "/messages",
    tag = "stores",
    security(("bearer" = ["admin"])),
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Fixes the message id, derived from `from` and the key (as on /publish)"),
        ("traceparent" = Option<String>, Header, description = "W3C Trace Context: stored in the message's `trace` (as on /publish)"),
        ("tracestate" = Option<String>, Header, description = "W3C Trace Context vendor entries, stored with `traceparent`"),
    ),
    responses(
        (status = 202, description = "Kept; sent when the medium takes it", body = Receipt),
        (status = 400, description = "Bad JSON, an invalid message, or no `from`", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token, or not in the catalog", body = ErrorBody),
        (status = 413, description = "Over common.intracom.max_message_bytes", body = ErrorBody),
        (status = 503, description = "The outbox is full", body = ErrorBody),
    )
)]
pub(crate) async fn keep(
    State(state): State<AppState>,
    _admin: Admin,
    headers: HeaderMap,
    Json(request): Json<PublishRequest>,
) -> ApiResult<(StatusCode, axum::Json<Receipt>)> {
    let from = request
        .from
        .clone()
        .ok_or_else(|| ApiError::BadRequest("`from` is required: the sending service".into()))?;
    let id = idempotency_id(&from, &headers)?;
    let mut message = request.into_message(&from, id)?;
    message.trace = trace_of(&headers);
    let receipt = Receipt::from(state.bus_as(&from)?.publish_later(message).await?);
    Ok((StatusCode::ACCEPTED, axum::Json(receipt)))
}

/// The messages waiting in this gateway's outbox, oldest first.
#[utoipa::path(
    get,
    path = "/messages",
    tag = "stores",
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, description = "The messages not routed yet", body = [MessageJson]),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
    )
)]
pub(crate) async fn waiting(
    State(state): State<AppState>,
    _admin: Admin,
) -> ApiResult<axum::Json<Vec<MessageJson>>> {
    let messages = state.bus().outbox_messages();
    Ok(axum::Json(messages.iter().map(MessageJson::from).collect()))
}

/// Takes a message out of the outbox before it is sent.
#[utoipa::path(
    delete,
    path = "/messages/{messageId}",
    tag = "stores",
    security(("bearer" = ["admin"])),
    params(("messageId" = String, Path, description = "The message id")),
    responses(
        (status = 200, description = "Removed: it will not be sent", body = Removed),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "Not waiting (sent already, or never kept)", body = ErrorBody),
        (status = 409, description = "Being sent to the medium now: it cannot be taken back", body = ErrorBody),
    )
)]
pub(crate) async fn drop_waiting(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Removed>> {
    match state.bus().outbox_remove(&id)? {
        OutboxRemoval::Removed => Ok(axum::Json(Removed { removed: 1 })),
        OutboxRemoval::Sending => Err(ApiError::Conflict(format!(
            "message `{id}` is being sent to the medium now: it cannot be taken back (if the medium does not take it, it waits again and can be removed then)"
        ))),
        _ => Err(ApiError::NotFound(format!(
            "message `{id}` is not waiting in the outbox (sent already, or never kept)"
        ))),
    }
}

/// An idempotency record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Record {
    /// The consumer that handled the message.
    pub consumer: String,
    /// The message id.
    #[serde(rename = "messageId")]
    pub message_id: String,
    /// `done`, or `running` while a holder runs the handler.
    pub state: String,
    /// The handler's result, if it recorded one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
    /// When it was reserved or done, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
}

impl From<ProcessedRecord> for Record {
    fn from(r: ProcessedRecord) -> Self {
        Record {
            consumer: r.consumer,
            message_id: r.id,
            state: if r.done { "done" } else { "running" }.into(),
            result: r.result.as_ref().map(json_of),
            timestamp: r.at.map(rfc3339),
        }
    }
}

/// A message to mark processed.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MarkProcessed {
    /// The consumer (a name that stays the same across restarts and instances).
    #[schema(value_type = Name)]
    pub consumer: String,
    /// The message id.
    #[serde(rename = "messageId")]
    #[schema(value_type = Name)]
    pub message_id: String,
    /// The result to give to later checks: a JSON object.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
}

/// Marks a message processed by a consumer, with an optional result. A message already
/// marked keeps its first record (200); one whose handler is running elsewhere now is a
/// conflict (409).
#[utoipa::path(
    post,
    path = "/idempotency",
    tag = "stores",
    security(("bearer" = ["admin"])),
    responses(
        (status = 201, description = "Marked", body = Record),
        (status = 200, description = "Marked before: the first record", body = Record),
        (status = 400, description = "Bad JSON or names", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 409, description = "A handler is running for it now", body = ErrorBody),
    )
)]
pub(crate) async fn mark(
    State(state): State<AppState>,
    _admin: Admin,
    Json(request): Json<MarkProcessed>,
) -> ApiResult<(StatusCode, axum::Json<Record>)> {
    check_name("consumer", &request.consumer)?;
    check_name("messageId", &request.message_id)?;
    let result = request
        .result
        .map(|r| document_of(r, "result"))
        .transpose()?;
    let medium = state.bus().medium();
    let records = medium.records_or_unsupported()?;
    let (consumer, id) = (&request.consumer, &request.message_id);
    let owner = format!("{}/gateway", state.bus().instance());
    let status = match records
        .processed_reserve(consumer, id, &owner, Duration::from_secs(60))
        .await?
    {
        Reservation::Reserved => {
            if let Err(error) = records
                .processed_complete(consumer, id, &owner, result)
                .await
            {
                // Not left reserved for a minute: a retry of this call may record it.
                if let Err(release) = records.processed_release(consumer, id, &owner).await {
                    tracing::warn!(%release, consumer, message_id = %id, "gateway: idempotency reservation not released");
                }
                return Err(error.into());
            }
            StatusCode::CREATED
        }
        Reservation::Done(_) => StatusCode::OK,
        _ => {
            return Err(ApiError::Conflict(format!(
                "consumer `{consumer}` is handling message `{id}` now"
            )))
        }
    };
    let record = medium
        .inspection_or_unsupported("reading idempotency records")?
        .processed_get(consumer, id)
        .await?
        .ok_or_else(|| {
            // A DELETE of the same record ran between the write and this read.
            ApiError::Conflict(format!(
                "the record of consumer `{consumer}` for message `{id}` was removed meanwhile"
            ))
        })?;
    Ok((status, axum::Json(Record::from(record))))
}

/// Which consumer's record.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConsumerParams {
    /// The consumer.
    pub consumer: String,
}

/// Whether a consumer processed a message, with the result it recorded.
#[utoipa::path(
    get,
    path = "/idempotency/{messageId}",
    tag = "stores",
    security(("bearer" = ["admin"])),
    params(("messageId" = String, Path, description = "The message id"), ConsumerParams),
    responses(
        (status = 200, description = "The record", body = Record),
        (status = 400, description = "Bad parameters", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "Not processed (or the record expired)", body = ErrorBody),
    )
)]
pub(crate) async fn check(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
    Query(params): Query<ConsumerParams>,
) -> ApiResult<axum::Json<Record>> {
    state
        .bus()
        .medium()
        .inspection_or_unsupported("reading idempotency records")?
        .processed_get(&params.consumer, &id)
        .await?
        .map(|record| axum::Json(Record::from(record)))
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "consumer `{}` has no record of message `{id}`",
                params.consumer
            ))
        })
}

/// Forgets that a consumer processed a message: a later delivery runs its handler again.
#[utoipa::path(
    delete,
    path = "/idempotency/{messageId}",
    tag = "stores",
    security(("bearer" = ["admin"])),
    params(("messageId" = String, Path, description = "The message id"), ConsumerParams),
    responses(
        (status = 200, description = "Removed", body = Removed),
        (status = 400, description = "Bad parameters", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 404, description = "No such record", body = ErrorBody),
    )
)]
pub(crate) async fn forget(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
    Query(params): Query<ConsumerParams>,
) -> ApiResult<axum::Json<Removed>> {
    match state
        .bus()
        .medium()
        .inspection_or_unsupported("removing idempotency records")?
        .processed_remove(&params.consumer, &id)
        .await?
    {
        0 => Err(ApiError::NotFound(format!(
            "consumer `{}` has no record of message `{id}`",
            params.consumer
        ))),
        removed => Ok(axum::Json(Removed { removed })),
    }
}
