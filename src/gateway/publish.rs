//! Sending over HTTP: `POST /publish` and `POST /request/{service}/{action}`.
//!
//! Why it exists: a service written in any language sends on the bus with one HTTP
//! call, under the identity of its token. Everything the library checks still holds
//! (catalog, names, size); the gateway adds only what HTTP needs: the sender comes from
//! the token, and an `Idempotency-Key` header fixes the message id, so a POST retried
//! after a lost response stores the message once. The id is derived from the sending
//! service and the key ([`idempotent_id`]): keys of different services never meet, so
//! one service cannot suppress another's messages by using its keys first, nor learn
//! whether an id exists.
//!
//! A key stands for one request: sent again with the same request it answers
//! `duplicate`; sent with another one (another payload, target, type, priority) it is
//! refused with 422 `idempotency_key_reused` rather than dropping the new request
//! silently, as the IETF `Idempotency-Key` header draft asks. The digest of the request
//! that used a key is kept on the medium, beside the message and as long (an
//! idempotency record of its own, see [`KEYED_REQUESTS`]): every gateway of the bus
//! sees it, and so does a restarted one.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::ServiceCaller;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{Json, Path, Query};
use super::model::{document_of, json_of, Name, Receipt};
use super::AppState;
use crate::bus::Intracom;
use crate::medium::Reservation;
use crate::message::{check_name, Message, MessageType};
use crate::trace::TraceContext;

/// The header whose value, with the sending service, fixes the message id
/// ([`idempotent_id`]).
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// The message id of a publish by `sender` with the `Idempotency-Key` `key`: `ik-`
/// and 32 hexadecimal digits (128 bits of the SHA-256 of the service and the key).
/// The same sender and key always give the same id (a retried POST stores once); two
/// services using the same key give two ids.
pub fn idempotent_id(sender: &str, key: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    // Names hold no control characters (check_name): NUL separates them unambiguously.
    hash.update(b"intracom Idempotency-Key\0");
    hash.update(sender.as_bytes());
    hash.update(b"\0");
    hash.update(key.as_bytes());
    let digest = hash.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("ik-{hex}")
}

/// The consumer name of the idempotency records (the medium's `processed` store) that
/// keep, for each message stored under an `Idempotency-Key`, the digest of the request
/// ([`request_digest`]). It holds spaces: no subscription can be named so.
pub(crate) const KEYED_REQUESTS: &str = "gateway Idempotency-Key";

/// How long a gateway holds a key's record while it publishes: a request with the same
/// key meanwhile gets 409 (a gateway that dies holding it lets the next take it over
/// after this).
const KEY_LEASE: Duration = Duration::from_secs(30);

/// The digest of what a message says, as far as a retry must repeat it: target,
/// instance, type, delivery, action, priority and payload (the payload's keys sorted, so
/// that a client that writes its object's keys in another order repeats it). SHA-256,
/// hex.
pub(crate) fn request_digest(message: &Message) -> String {
    use sha2::{Digest, Sha256};
    fn sorted(document: &bson::Document) -> bson::Document {
        let mut keys: Vec<&String> = document.keys().collect();
        keys.sort();
        keys.into_iter()
            .filter_map(|key| Some((key.clone(), value(document.get(key)?))))
            .collect()
    }
    fn value(bson: &bson::Bson) -> bson::Bson {
        match bson {
            bson::Bson::Document(d) => bson::Bson::Document(sorted(d)),
            bson::Bson::Array(items) => bson::Bson::Array(items.iter().map(value).collect()),
            other => other.clone(),
        }
    }
    let described = bson::doc! {
        "to": message.dest_service.as_deref(),
        "instance": message.dest_instance.as_deref(),
        "type": message.kind.as_str(),
        "delivery": message.delivery.as_str(),
        "action": &message.action,
        "priority": message.priority,
        "query": sorted(&message.query),
    };
    // A document that does not encode is refused by the publish after this anyway.
    let bytes = bson::to_vec(&described).unwrap_or_default();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Publishes `message`, whose id an `Idempotency-Key` fixed, as `bus`: refused with 422
/// when the key was used for another request ([`request_digest`]), 409 while another
/// request with the key is being published. When the medium cannot keep the record
/// (it is unavailable: the message goes to the outbox), the message is published
/// unchecked.
async fn publish_keyed(bus: &Intracom, message: Message) -> ApiResult<Receipt> {
    let id = message.id.clone();
    let digest = request_digest(&message);
    let medium = Arc::clone(bus.medium());
    let owner = crate::message::new_id();
    let Some(records) = medium.records() else {
        tracing::warn!(message_id = %id, medium = medium.name(), "gateway: the medium keeps no records to check the Idempotency-Key: published unchecked");
        return Ok(Receipt::from(bus.publish(message).await?));
    };
    match records
        .processed_reserve(KEYED_REQUESTS, &id, &owner, KEY_LEASE)
        .await
    {
        Ok(Reservation::Reserved) => match bus.publish(message).await {
            Ok(published) => {
                let record = bson::doc! { "digest": &digest };
                if let Err(error) = records
                    .processed_complete(KEYED_REQUESTS, &id, &owner, Some(record))
                    .await
                {
                    tracing::warn!(message_id = %id, %error, "gateway: the digest of a keyed request was not kept: a reuse of its key with another request will not be told");
                }
                Ok(Receipt::from(published))
            }
            Err(error) => {
                if let Err(release) = records.processed_release(KEYED_REQUESTS, &id, &owner).await {
                    tracing::debug!(message_id = %id, error = %release, "gateway: a keyed request's record not released (its lease will lapse)");
                }
                Err(error.into())
            }
        },
        Ok(Reservation::Done(Some(record)))
            if record.get_str("digest").is_ok_and(|kept| kept != digest) =>
        {
            Err(ApiError::KeyReused(format!(
                "this Idempotency-Key was used for another request (another payload, \
                 target, type or priority): message `{id}` was stored then; nothing was sent \
                 now (use a new key for a new request)"
            )))
        }
        Ok(Reservation::Done(_)) => Ok(Receipt::from(bus.publish(message).await?)),
        Ok(Reservation::Busy) => Err(ApiError::Conflict(format!(
            "a request with this Idempotency-Key (message `{id}`) is being published now: \
             try again"
        ))),
        Err(error) => {
            tracing::warn!(message_id = %id, %error, "gateway: cannot check the Idempotency-Key's record: published unchecked");
            Ok(Receipt::from(bus.publish(message).await?))
        }
    }
}

/// A message to publish.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// The action: declared by the target service, or by the sender for a broadcast.
    #[schema(value_type = Name)]
    pub action: String,
    /// The target service; absent or null: every service (a broadcast).
    #[serde(default)]
    #[schema(value_type = Option<Name>)]
    pub to: Option<String>,
    /// One instance of `to` (needs `to`).
    #[serde(default)]
    #[schema(value_type = Option<Name>)]
    pub instance: Option<String>,
    /// The payload: a JSON object (extended JSON accepted). Default `{}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub query: Option<serde_json::Value>,
    /// The exchange (default `broadcast` without `to`, else `fire_and_forget`).
    #[serde(default, rename = "type")]
    pub kind: Option<MessageType>,
    /// Work for exactly one instance of `to` (`delivery: one`), claimed by a worker.
    #[serde(default)]
    pub work: bool,
    /// Work priority, higher first (default 0).
    #[serde(default)]
    pub priority: i32,
    /// The sending service. On `POST /publish` it must be the token's own service (the
    /// default); on `POST /messages` (admin) it is required.
    #[serde(default)]
    #[schema(value_type = Option<Name>)]
    pub from: Option<String>,
    /// On `POST /messages` only: the message id, kept (a bus handing over a message it
    /// could not publish keeps its id, so that it is stored once). `POST /publish`
    /// refuses it: its `Idempotency-Key` header fixes the id there.
    #[serde(default)]
    #[schema(value_type = Option<Name>)]
    pub id: Option<String>,
}

impl PublishRequest {
    /// The message this request describes, from `sender`, with `id` if given.
    pub(crate) fn into_message(self, sender: &str, id: Option<String>) -> ApiResult<Message> {
        let mut message = match (&self.to, &self.instance) {
            (None, None) => Message::broadcast(&self.action),
            (Some(to), None) => Message::to_service(to, &self.action),
            (Some(to), Some(instance)) => Message::to_instance(to, instance, &self.action),
            (None, Some(_)) => {
                return Err(ApiError::BadRequest(
                    "`instance` needs `to`: name the service of the instance".into(),
                ))
            }
        };
        if let Some(query) = self.query {
            message = message.body(document_of(query, "query")?);
        }
        if let Some(kind) = self.kind {
            message = message.kind(kind);
        }
        if self.work {
            if self.to.is_none() {
                return Err(ApiError::BadRequest(
                    "`work` needs `to`: work is done by one instance of one service".into(),
                ));
            }
            message = message.work();
        }
        message = message.priority(self.priority).from_service(sender);
        if let Some(id) = id {
            message = message.with_id(id);
        }
        Ok(message)
    }
}

/// The message id fixed by the `Idempotency-Key` header for a message from `sender`
/// ([`idempotent_id`]), if the header is there.
pub(crate) fn idempotency_id(sender: &str, headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| ApiError::BadRequest("the Idempotency-Key header is not ASCII".into()))?;
    check_name("Idempotency-Key", key)?;
    Ok(Some(idempotent_id(sender, key)))
}

/// The W3C trace context of an HTTP request: its `traceparent` header, with its
/// `tracestate` headers joined. An invalid `traceparent` is ignored (the W3C rule): the
/// message then carries no context.
pub(crate) fn trace_of(headers: &HeaderMap) -> Option<TraceContext> {
    let traceparent = headers.get(TRACEPARENT)?.to_str().ok()?.trim();
    let tracestate = headers
        .get_all(TRACESTATE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|value| !value.is_empty())
        .collect::<Vec<_>>()
        .join(",");
    TraceContext::new(traceparent, (!tracestate.is_empty()).then_some(tracestate))
}

/// The W3C Trace Context header naming the caller's span.
pub(crate) const TRACEPARENT: &str = "traceparent";
/// The W3C Trace Context header of vendor entries.
pub(crate) const TRACESTATE: &str = "tracestate";

/// Publishes a message as the token's service: to every service, to one service, or
/// to one instance. With an `Idempotency-Key` header the message id is derived from
/// the service and the key: the same POST sent again stores nothing new and answers
/// 200 with `duplicate`; another request with the key is refused with 422; another
/// service's key never collides with it.
#[utoipa::path(
    post,
    path = "/publish",
    tag = "messages",
    security(("bearer" = [])),
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Fixes the message id (derived from the token's service and the key): a retried POST stores the message once"),
        ("traceparent" = Option<String>, Header, description = "W3C Trace Context: stored in the message's `trace` (an invalid value is ignored); the handlers' spans are its children"),
        ("tracestate" = Option<String>, Header, description = "W3C Trace Context vendor entries, stored with `traceparent`"),
    ),
    responses(
        (status = 201, description = "Stored", body = Receipt),
        (status = 200, description = "Already stored under this Idempotency-Key (of this service)", body = Receipt),
        (status = 202, description = "The medium is unavailable: kept in the outbox", body = Receipt),
        (status = 400, description = "Bad JSON or an invalid message", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Another service's identity, or not in the catalog", body = ErrorBody),
        (status = 409, description = "A request with this Idempotency-Key is being published now: try again", body = ErrorBody),
        (status = 413, description = "Body or message over common.intracom.max_message_bytes", body = ErrorBody),
        (status = 422, description = "This Idempotency-Key was used for another request (code `idempotency_key_reused`): nothing sent", body = ErrorBody),
        (status = 503, description = "Unavailable and the outbox is full", body = ErrorBody),
    )
)]
pub(crate) async fn publish(
    State(state): State<AppState>,
    caller: ServiceCaller,
    headers: HeaderMap,
    Json(request): Json<PublishRequest>,
) -> ApiResult<(StatusCode, axum::Json<Receipt>)> {
    let service = caller.as_service(request.from.as_deref())?.to_string();
    if request.id.is_some() {
        return Err(ApiError::BadRequest(
            "`id` is taken on POST /messages only: send an Idempotency-Key header to fix the id of a publish".into(),
        ));
    }
    let id = idempotency_id(&service, &headers)?;
    let keyed = id.is_some();
    let mut message = request.into_message(&service, id)?;
    message.trace = trace_of(&headers);
    let bus = state.bus_as(&service)?;
    let receipt = if keyed {
        publish_keyed(&bus, message).await?
    } else {
        Receipt::from(bus.publish(message).await?)
    };
    state.series().published();
    tracing::debug!(message_id = %receipt.id, service, status = ?receipt.status, "gateway: published");
    Ok((receipt.status_code(), axum::Json(receipt)))
}

/// Parameters of a request.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RequestParams {
    /// How long to wait for the answer, in ms (default
    /// `common.intracom.request_timeout_ms`; at most the gateway's limit).
    #[param(minimum = 1)]
    pub timeout_ms: Option<u64>,
}

/// The answer to a request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Answer {
    /// The handler's result (null when it returned none).
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
}

/// Calls `action` of `service` as the token's service and waits for the answer (one
/// instance of `service` answers). 504 when the time-out passes first (the request is
/// then marked `state: error`), 502 when the handler failed.
#[utoipa::path(
    post,
    path = "/request/{service}/{action}",
    tag = "messages",
    security(("bearer" = [])),
    params(
        ("service" = String, Path, description = "The service that answers"),
        ("action" = String, Path, description = "The action"),
        RequestParams,
        ("traceparent" = Option<String>, Header, description = "W3C Trace Context: stored in the request's `trace` (an invalid value is ignored); the handler's span is its child"),
        ("tracestate" = Option<String>, Header, description = "W3C Trace Context vendor entries, stored with `traceparent`"),
    ),
    request_body(content = Object, description = "The query: a JSON object (extended JSON accepted)"),
    responses(
        (status = 200, description = "The answer", body = Answer),
        (status = 400, description = "Bad JSON or names", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A token without a service, or an action the catalog does not declare", body = ErrorBody),
        (status = 413, description = "Body over common.intracom.max_message_bytes", body = ErrorBody),
        (status = 502, description = "The handler failed: its message", body = ErrorBody),
        (status = 504, description = "No answer within the time-out", body = ErrorBody),
    )
)]
pub(crate) async fn request(
    State(state): State<AppState>,
    caller: ServiceCaller,
    Path((service, action)): Path<(String, String)>,
    Query(params): Query<RequestParams>,
    headers: HeaderMap,
    Json(query): Json<serde_json::Value>,
) -> ApiResult<axum::Json<Answer>> {
    let own = caller.service().to_string();
    let query = document_of(query, "the request body")?;
    let timeout = match params.timeout_ms {
        Some(0) => return Err(ApiError::BadRequest("timeout_ms must be at least 1".into())),
        Some(ms) => Duration::from_millis(ms),
        None => Duration::from_millis(state.bus().config().request_timeout_ms),
    }
    .min(state.options().max_request_timeout);
    check_name("service", &service)?;
    check_name("action", &action)?;
    let bus = state.bus_as(&own)?;
    let mut call = bus.request(&service, &action, &query).timeout(timeout);
    if let Some(trace) = trace_of(&headers) {
        call = call.trace(trace);
    }
    let result: Option<bson::Document> = call.await?;
    Ok(axum::Json(Answer {
        result: result.as_ref().map(json_of),
    }))
}
