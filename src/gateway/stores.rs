//! The two stores as REST resources: the MessageStore (`/messages`: messages not
//! routed yet) over the outbox, and the IdempotencyStore (`/idempotency`) over the
//! idempotency records.
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
//! - For a bus that keeps its run-once records here
//!   (`common.intracom.stores.idempotency=http`): `POST
//!   /idempotency/{messageId}/reservation` reserves a record for an owner and a lease
//!   (`reserved`, `done` with the result, or `busy`), `POST /idempotency` with `owner`
//!   completes that owner's reservation, and `DELETE /idempotency/{messageId}` with
//!   `owner` releases it (a done record stays).
//!
//! Who may call: an admin token, on every record and message. A service token, on
//! its own only: the records of consumers named after its service (`<service>` or
//! `<service>.<name>`), and the messages it sends (`from` is its service, as on
//! `/publish`); it lists and removes only those. So a service's bus can keep its stores
//! here with its own token, and cannot read or undo another service's.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use axum::response::{IntoResponse, Response};

use super::auth::AnyCaller;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{Json, Path, Query};
use super::model::{document_of, json_of, rfc3339, MessageJson, Name, Receipt, Removed};
use super::publish::{idempotency_id, trace_of, PublishRequest};
use super::AppState;
use crate::medium::{ProcessedRecord, Reservation};
use crate::message::check_name;
use crate::OutboxRemoval;

/// The service a non-admin caller is limited to; `None` for an admin token.
fn scope(caller: &AnyCaller) -> ApiResult<Option<String>> {
    let identity = caller.identity();
    if identity.admin {
        return Ok(None);
    }
    Ok(Some(caller.to_service()?.service().to_string()))
}

/// Refuses a service token a consumer that is not named after its service.
fn check_consumer(caller: &AnyCaller, consumer: &str) -> ApiResult<()> {
    match scope(caller)? {
        Some(service)
            if consumer != service
                && !consumer
                    .strip_prefix(service.as_str())
                    .is_some_and(|rest| rest.starts_with('.')) =>
        {
            Err(ApiError::Forbidden(format!(
                "a token of service `{service}` uses the idempotency records of its own consumers, `{service}` or `{service}.<name>`, not `{consumer}`"
            )))
        }
        _ => Ok(()),
    }
}

/// Keeps a message in this gateway's outbox (the MessageStore): it is checked as a
/// publish is (catalog, size), then sent after what already waits there as soon as the
/// medium takes it. `from` names the sending service: any with an admin token
/// (required then, unless the token has a service too), the token's own otherwise.
/// `id` keeps the message's id (a bus handing over what its medium could not take).
#[utoipa::path(
    post,
    path = "/messages",
    tag = "stores",
    security(("bearer" = [])),
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Fixes the message id, derived from `from` and the key (as on /publish); not with `id`"),
        ("traceparent" = Option<String>, Header, description = "W3C Trace Context: stored in the message's `trace` (as on /publish)"),
        ("tracestate" = Option<String>, Header, description = "W3C Trace Context vendor entries, stored with `traceparent`"),
    ),
    responses(
        (status = 202, description = "Kept; sent when the medium takes it", body = Receipt),
        (status = 400, description = "Bad JSON, an invalid message, no `from`, or both `id` and Idempotency-Key", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Another service's `from` for a service token, or not in the catalog", body = ErrorBody),
        (status = 413, description = "Over common.intracom.max_message_bytes", body = ErrorBody),
        (status = 503, description = "The outbox is full", body = ErrorBody),
    )
)]
pub(crate) async fn keep(
    State(state): State<AppState>,
    caller: AnyCaller,
    headers: HeaderMap,
    Json(mut request): Json<PublishRequest>,
) -> ApiResult<(StatusCode, axum::Json<Receipt>)> {
    let identity = caller.identity();
    let from = match (&request.from, &identity.service) {
        (Some(from), _) if identity.admin => from.clone(),
        (_, Some(_)) => caller
            .to_service()?
            .as_service(request.from.as_deref())?
            .to_string(),
        (None, None) => {
            return Err(ApiError::BadRequest(
                "`from` is required: the sending service".into(),
            ))
        }
        (Some(_), None) => {
            return Err(ApiError::Forbidden(
                "this token has neither a service nor admin".into(),
            ))
        }
    };
    let keyed = idempotency_id(&from, &headers)?;
    let id = match (request.id.take(), keyed) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "`id` or an Idempotency-Key header, not both".into(),
            ))
        }
        (Some(id), None) => {
            check_name("id", &id)?;
            Some(id)
        }
        (None, keyed) => keyed,
    };
    let mut message = request.into_message(&from, id)?;
    message.trace = trace_of(&headers);
    let receipt = Receipt::from(state.bus_as(&from)?.publish_later(message).await?);
    Ok((StatusCode::ACCEPTED, axum::Json(receipt)))
}

/// The messages waiting in this gateway's outbox, oldest first: all of them for an
/// admin token, those the token's service sent for a service token.
#[utoipa::path(
    get,
    path = "/messages",
    tag = "stores",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The messages not routed yet", body = [MessageJson]),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A token with neither a service nor admin", body = ErrorBody),
    )
)]
pub(crate) async fn waiting(
    State(state): State<AppState>,
    caller: AnyCaller,
) -> ApiResult<axum::Json<Vec<MessageJson>>> {
    let scope = scope(&caller)?;
    let messages = state.bus().outbox_messages();
    Ok(axum::Json(
        messages
            .iter()
            .filter(|m| scope.as_ref().is_none_or(|s| m.source_service == *s))
            .map(MessageJson::from)
            .collect(),
    ))
}

/// Takes a message out of the outbox before it is sent (a service token: one its
/// service sent).
#[utoipa::path(
    delete,
    path = "/messages/{messageId}",
    tag = "stores",
    security(("bearer" = [])),
    params(("messageId" = String, Path, description = "The message id")),
    responses(
        (status = 200, description = "Removed: it will not be sent", body = Removed),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A token with neither a service nor admin", body = ErrorBody),
        (status = 404, description = "Not waiting (sent already, or never kept)", body = ErrorBody),
        (status = 409, description = "Being sent to the medium now: it cannot be taken back", body = ErrorBody),
    )
)]
pub(crate) async fn drop_waiting(
    State(state): State<AppState>,
    caller: AnyCaller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Removed>> {
    if let Some(service) = scope(&caller)? {
        let own = state
            .bus()
            .outbox_messages()
            .iter()
            .any(|m| m.id == id && m.source_service == service);
        if !own {
            return Err(ApiError::NotFound(format!(
                "no message `{id}` of service `{service}` is waiting in the outbox"
            )));
        }
    }
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
    /// The owner of a reservation (`POST /idempotency/{messageId}/reservation`):
    /// completes that reservation, if the owner still holds it.
    #[serde(default)]
    #[schema(value_type = Option<Name>)]
    pub owner: Option<String>,
}

/// Marks a message processed by a consumer, with an optional result. A message already
/// marked keeps its first record (200); one whose handler is running elsewhere now is a
/// conflict (409). With `owner`, completes that owner's reservation (201), or 409 if it
/// does not hold it any more (its lease lapsed and another took it).
#[utoipa::path(
    post,
    path = "/idempotency",
    tag = "stores",
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Marked", body = Record),
        (status = 200, description = "Marked before: the first record", body = Record),
        (status = 400, description = "Bad JSON or names", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A service token, for a consumer not named after its service", body = ErrorBody),
        (status = 409, description = "A handler is running for it now, or the owner's reservation was lost", body = ErrorBody),
    )
)]
pub(crate) async fn mark(
    State(state): State<AppState>,
    caller: AnyCaller,
    Json(request): Json<MarkProcessed>,
) -> ApiResult<(StatusCode, axum::Json<Record>)> {
    check_name("consumer", &request.consumer)?;
    check_name("messageId", &request.message_id)?;
    check_consumer(&caller, &request.consumer)?;
    let result = request
        .result
        .map(|r| document_of(r, "result"))
        .transpose()?;
    let medium = state.bus().medium();
    let records = medium.records_or_unsupported()?;
    let (consumer, id) = (&request.consumer, &request.message_id);
    if let Some(owner) = &request.owner {
        check_name("owner", owner)?;
        records
            .processed_complete(consumer, id, owner, result.clone())
            .await?;
        let Some(inspection) = medium.inspection() else {
            // Nothing to read it back with: the medium's word for it.
            return Ok((
                StatusCode::CREATED,
                axum::Json(Record {
                    consumer: consumer.clone(),
                    message_id: id.clone(),
                    state: "done".into(),
                    result: result.as_ref().map(json_of),
                    timestamp: Some(rfc3339(bson::DateTime::now())),
                }),
            ));
        };
        return match inspection.processed_get(consumer, id).await? {
            Some(record) if record.done => Ok((StatusCode::CREATED, axum::Json(record.into()))),
            _ => Err(ApiError::Conflict(format!(
                "`{owner}` does not hold the reservation of consumer `{consumer}` for message `{id}` any more (its lease lapsed)"
            ))),
        };
    }
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
    security(("bearer" = [])),
    params(("messageId" = String, Path, description = "The message id"), ConsumerParams),
    responses(
        (status = 200, description = "The record", body = Record),
        (status = 400, description = "Bad parameters", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A service token, for a consumer not named after its service", body = ErrorBody),
        (status = 404, description = "Not processed (or the record expired)", body = ErrorBody),
    )
)]
pub(crate) async fn check(
    State(state): State<AppState>,
    caller: AnyCaller,
    Path(id): Path<String>,
    Query(params): Query<ConsumerParams>,
) -> ApiResult<axum::Json<Record>> {
    check_consumer(&caller, &params.consumer)?;
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

/// Which consumer's record, and whose reservation.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ForgetParams {
    /// The consumer.
    pub consumer: String,
    /// Releases this owner's reservation only (a done record, or another's
    /// reservation, stays): what a bus does when its handler failed.
    pub owner: Option<String>,
}

/// Forgets that a consumer processed a message: a later delivery runs its handler
/// again. With `owner`, releases that owner's reservation instead (204).
#[utoipa::path(
    delete,
    path = "/idempotency/{messageId}",
    tag = "stores",
    security(("bearer" = [])),
    params(("messageId" = String, Path, description = "The message id"), ForgetParams),
    responses(
        (status = 200, description = "Removed", body = Removed),
        (status = 204, description = "With `owner`: released, if that owner held it"),
        (status = 400, description = "Bad parameters", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A service token, for a consumer not named after its service", body = ErrorBody),
        (status = 404, description = "No such record", body = ErrorBody),
    )
)]
pub(crate) async fn forget(
    State(state): State<AppState>,
    caller: AnyCaller,
    Path(id): Path<String>,
    Query(params): Query<ForgetParams>,
) -> ApiResult<Response> {
    check_consumer(&caller, &params.consumer)?;
    if let Some(owner) = &params.owner {
        check_name("owner", owner)?;
        state
            .bus()
            .medium()
            .records_or_unsupported()?
            .processed_release(&params.consumer, &id, owner)
            .await?;
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
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
        removed => Ok(axum::Json(Removed { removed }).into_response()),
    }
}

/// A reservation to take.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReserveRequest {
    /// The consumer.
    #[schema(value_type = Name)]
    pub consumer: String,
    /// Who holds it while the handler runs (unique per attempt).
    #[schema(value_type = Name)]
    pub owner: String,
    /// How long it holds, in ms (1 to 86 400 000): another owner takes it over after.
    #[serde(rename = "leaseMs")]
    #[schema(minimum = 1, maximum = 86_400_000)]
    pub lease_ms: u64,
}

/// What a reservation found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReservationAnswer {
    /// `reserved` (run the handler, then complete or release), `done` (it ran: its
    /// result is here) or `busy` (another owner runs it now: ask again later).
    pub reservation: String,
    /// The result recorded, when `done` and there is one, in canonical extended JSON
    /// (`{"$numberLong": "1"}`): a bus reads back the types its handler returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
}

/// Reserves a message for a consumer before its handler runs, as a bus's
/// `run_once` does: one owner at a time, for a lease. Complete it with `POST
/// /idempotency` and `owner`, or release it with `DELETE /idempotency/{messageId}` and
/// `owner`.
#[utoipa::path(
    post,
    path = "/idempotency/{messageId}/reservation",
    tag = "stores",
    security(("bearer" = [])),
    params(("messageId" = String, Path, description = "The message id")),
    responses(
        (status = 200, description = "What the reservation found", body = ReservationAnswer),
        (status = 400, description = "Bad JSON, names or lease", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A service token, for a consumer not named after its service", body = ErrorBody),
    )
)]
pub(crate) async fn reserve(
    State(state): State<AppState>,
    caller: AnyCaller,
    Path(id): Path<String>,
    Json(request): Json<ReserveRequest>,
) -> ApiResult<axum::Json<ReservationAnswer>> {
    check_name("messageId", &id)?;
    check_name("consumer", &request.consumer)?;
    check_name("owner", &request.owner)?;
    check_consumer(&caller, &request.consumer)?;
    if !(1..=86_400_000).contains(&request.lease_ms) {
        return Err(ApiError::BadRequest(format!(
            "`leaseMs` is {}: 1 to 86400000",
            request.lease_ms
        )));
    }
    let reservation = state
        .bus()
        .medium()
        .records_or_unsupported()?
        .processed_reserve(
            &request.consumer,
            &id,
            &request.owner,
            Duration::from_millis(request.lease_ms),
        )
        .await?;
    let answer = match reservation {
        Reservation::Reserved => ReservationAnswer {
            reservation: "reserved".into(),
            result: None,
        },
        Reservation::Done(result) => ReservationAnswer {
            reservation: "done".into(),
            result: result.map(|r| bson::Bson::Document(r).into_canonical_extjson()),
        },
        _ => ReservationAnswer {
            reservation: "busy".into(),
            result: None,
        },
    };
    Ok(axum::Json(answer))
}
