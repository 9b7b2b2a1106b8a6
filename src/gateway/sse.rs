//! Following the bus over HTTP: `GET /subscribe/{topic}` as Server-Sent Events, and
//! `POST /ack/{messageId}`.
//!
//! Why it exists: a consumer in any language follows the bus with a plain HTTP GET.
//! Each SSE event's `id:` is the message's position in the medium (its BSON, base64url),
//! so a client that reconnects with `Last-Event-ID` (every SSE client does) resumes
//! right after the last event it received: no gap, whatever was published meanwhile,
//! as long as the medium retains it.
//!
//! Events:
//! - `message`: a message ([`MessageJson`]);
//! - `lost`: messages expired before this subscriber read them (retention); the stream
//!   goes on with the oldest one retained;
//! - `lagged`: the client read so slowly that the gateway's buffer for it stayed full for
//!   [`GatewayOptions::sse_stall`](super::GatewayOptions): the stream ends after the
//!   events already buffered, and the client resumes with `Last-Event-ID`;
//! - `error`: the subscription failed; the stream ends.
//!
//! A slow client holds nobody up and costs bounded memory: each connection reads the
//! medium through its own cursor, at most [`GatewayOptions::sse_buffer`] events ahead of
//! what the connection has taken. A named subscription (`?name=`) keeps a checkpoint
//! in the medium, moved by `POST /ack/{messageId}?subscription=<name>`; at most
//! `max_in_flight` deliveries wait for an ack before the stream pauses. The saved
//! checkpoint wins over `Last-Event-ID` for a named subscription (the unacked ones come
//! again). A second connection with the same name takes over from the first.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use base64::Engine;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use utoipa::{IntoParams, ToSchema};

use super::auth::Caller;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{Path, Query};
use super::model::MessageJson;
use super::AppState;
use crate::delivery::{Delivery, Subscriber, Subscription};
use crate::filter::{Position, StartFrom};
use crate::message::check_name;

/// The SSE `id:` of a position: its BSON, base64url without padding. Lossless, so the
/// medium's own resume data (a change-stream token) comes back intact.
pub fn encode_position(position: &Position) -> String {
    let bytes = bson::to_vec(position).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A position from an SSE `id:` ([`encode_position`]), or why it is not one.
pub fn decode_position(id: &str) -> Result<Position, String> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(id.trim())
        .map_err(|e| format!("not base64url: {e}"))?;
    bson::from_slice(&bytes).map_err(|e| format!("not a position: {e}"))
}

/// Where a subscription starts when it has no position.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// What is published from now on (the default).
    #[default]
    Now,
    /// The oldest message the medium retains.
    Beginning,
}

/// Parameters of a subscription.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SubscribeParams {
    /// A named subscription: its checkpoint is kept in the medium and moved by acks.
    pub name: Option<String>,
    /// The subscriber's instance id: it also receives the messages to that instance.
    pub instance: Option<String>,
    /// Only messages from this service.
    pub source: Option<String>,
    /// Only this type.
    #[serde(rename = "type")]
    pub kind: Option<super::model::Kind>,
    /// Where to start without `Last-Event-ID` or checkpoint (default `now`).
    pub from: Option<Start>,
    /// Resume after this event id (for clients that cannot send `Last-Event-ID`).
    pub after: Option<String>,
    /// Every message on the bus, whatever its destination (admin tokens only).
    pub monitor: Option<bool>,
    /// With `monitor`: only messages from or to this service.
    pub service: Option<String>,
}

/// The data of a `lost`, `lagged` or `error` event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StreamNotice {
    /// `lost`, `fell_behind`, or an error code.
    pub code: String,
    /// What happened and what to do.
    pub message: String,
    /// For `lost`: how many messages, as far as the medium can tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

/// The deliveries of the named subscriptions streaming now, waiting for their acks.
#[derive(Default)]
pub(crate) struct Inflight {
    slots: Mutex<HashMap<String, Slot>>,
    generation: AtomicU64,
}

struct Slot {
    generation: u64,
    service: String,
    stop: CancellationToken,
    deliveries: HashMap<String, (Delivery, OwnedSemaphorePermit)>,
}

impl Inflight {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens the slot of a named subscription for a new connection; a connection already
    /// streaming it is stopped. Another service's live subscription of that name is a
    /// conflict.
    fn open(&self, name: &str, service: &str) -> ApiResult<(u64, CancellationToken)> {
        let mut slots = self.slots();
        if let Some(old) = slots.get(name) {
            if old.service != service {
                return Err(ApiError::Conflict(format!(
                    "subscription `{name}` is streaming to service `{}` now",
                    old.service
                )));
            }
            old.stop.cancel();
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let stop = CancellationToken::new();
        slots.insert(
            name.to_string(),
            Slot {
                generation,
                service: service.to_string(),
                stop: stop.clone(),
                deliveries: HashMap::new(),
            },
        );
        Ok((generation, stop))
    }

    fn keep(&self, name: &str, generation: u64, delivery: Delivery, permit: OwnedSemaphorePermit) {
        if let Some(slot) = self.slots().get_mut(name) {
            if slot.generation == generation {
                slot.deliveries
                    .insert(delivery.id.clone(), (delivery, permit));
            }
        }
    }

    fn close(&self, name: &str, generation: u64) {
        let mut slots = self.slots();
        if slots.get(name).is_some_and(|s| s.generation == generation) {
            slots.remove(name);
        }
    }

    fn take(&self, name: &str, id: &str, service: &str) -> ApiResult<Delivery> {
        let mut slots = self.slots();
        let slot = slots.get_mut(name).ok_or_else(|| {
            ApiError::NotFound(format!(
                "subscription `{name}` is not streaming: its unacked messages come again when it reconnects"
            ))
        })?;
        if slot.service != service {
            return Err(ApiError::Forbidden(format!(
                "subscription `{name}` belongs to service `{}`",
                slot.service
            )));
        }
        slot.deliveries
            .remove(id)
            .map(|(delivery, _permit)| delivery)
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "message `{id}` is not waiting for an ack on `{name}` (acked already, or not delivered on this connection)"
                ))
            })
    }
}

/// Follows the bus as Server-Sent Events. The subscriber receives, as the token's
/// service, the broadcasts, the messages to its service and those to its `instance`,
/// whose action is `topic` (`*`: every action).
#[utoipa::path(
    get,
    path = "/subscribe/{topic}",
    tag = "messages",
    security(("bearer" = [])),
    params(
        ("topic" = String, Path, description = "An action, or `*` for every action"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event (what SSE clients send on reconnect)"),
        SubscribeParams,
    ),
    responses(
        (status = 200, description = "An event stream: `message` events (data: MessageJson, id: the position), `lost`, `lagged` and `error` notices (data: StreamNotice)", content_type = "text/event-stream", body = String),
        (status = 400, description = "A bad parameter or Last-Event-ID", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A token without a service; `monitor` without admin", body = ErrorBody),
        (status = 409, description = "The named subscription streams to another service", body = ErrorBody),
    )
)]
pub(crate) async fn subscribe(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(topic): Path<String>,
    Query(params): Query<SubscribeParams>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>>> {
    let monitor = params.monitor.unwrap_or(false);
    let service = if monitor {
        caller.admin()?;
        caller
            .0
            .service
            .clone()
            .unwrap_or_else(|| state.bus().service().to_string())
    } else {
        caller.service()?.to_string()
    };
    let mut subscription = if monitor {
        Subscription::monitor()
    } else {
        Subscription::new()
    };
    if topic != "*" {
        check_name("topic", &topic)?;
        subscription = subscription.actions([topic.clone()]);
    }
    if let Some(source) = &params.source {
        subscription = subscription.sources([source.clone()]);
    }
    if let Some(kind) = params.kind {
        subscription = subscription.types([kind.into()]);
    }
    let last_event_id = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .map(str::to_string)
                .map_err(|_| ApiError::BadRequest("Last-Event-ID is not ASCII".into()))
        })
        .transpose()?
        .or(params.after.clone())
        .filter(|id| !id.trim().is_empty());
    subscription = subscription.start(match (&last_event_id, params.from.unwrap_or_default()) {
        (Some(id), _) => StartFrom::After(decode_position(id).map_err(|e| {
            ApiError::BadRequest(format!(
                "Last-Event-ID is not an event id of this gateway: {e}"
            ))
        })?),
        (None, Start::Beginning) => StartFrom::Beginning,
        (None, Start::Now) => StartFrom::Now,
    });
    let named = match &params.name {
        Some(name) => {
            check_name("name", name)?;
            subscription = subscription.with_name(name);
            Some(name.clone())
        }
        None => None,
    };
    let instance = params.instance.as_deref();
    let bus = state.bus().as_service(&service, instance)?;
    let slot = named
        .as_ref()
        .map(|name| state.inflight().open(name, &service))
        .transpose()?;
    let subscriber = match bus.subscribe(subscription).await {
        Ok(subscriber) => subscriber,
        Err(error) => {
            if let (Some(name), Some((generation, _))) = (&named, &slot) {
                state.inflight().close(name, *generation);
            }
            return Err(error.into());
        }
    };
    tracing::info!(service, topic, subscription = ?params.name, monitor, resumed = last_event_id.is_some(), "gateway: subscriber connected");
    let options = state.options();
    let (tx, rx) = mpsc::channel(options.sse_buffer.max(1));
    let (end_tx, end_rx) = oneshot::channel();
    let pump = Pump {
        state: state.clone(),
        subscriber,
        tx,
        stall: options.sse_stall,
        named: named.zip(slot),
        permits: Arc::new(Semaphore::new(options.max_in_flight.max(1))),
        service_filter: params.service.clone().filter(|_| monitor),
    };
    tokio::spawn(async move {
        let end = pump.run().await;
        let _ = end_tx.send(end);
    });
    let events = futures::stream::unfold((rx, Some(end_rx)), |(mut rx, end_rx)| async move {
        if let Some(event) = rx.recv().await {
            return Some((Ok(event), (rx, end_rx)));
        }
        // The pump is done: say why, once, then end the stream.
        let end = end_rx?.await.ok()?;
        end.notice().map(|event| (Ok(event), (rx, None)))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(options.keep_alive)))
}

/// Why a stream ended.
enum End {
    /// The client went away (or a newer connection took the name over).
    Gone,
    /// The client left its buffer full for the stall time.
    FellBehind,
    /// The subscription failed.
    Failed(ErrorBody),
    /// The bus shut down.
    Shutdown,
}

impl End {
    fn notice(self) -> Option<Event> {
        let (event, notice) = match self {
            End::Gone | End::Shutdown => return None,
            End::FellBehind => (
                "lagged",
                StreamNotice {
                    code: "fell_behind".into(),
                    message: "this client read too slowly and fell behind: reconnect with Last-Event-ID to resume where it stopped".into(),
                    count: None,
                },
            ),
            End::Failed(body) => (
                "error",
                StreamNotice {
                    code: body.code,
                    message: body.message,
                    count: None,
                },
            ),
        };
        Event::default().event(event).json_data(notice).ok()
    }
}

/// Reads one connection's subscription into its bounded buffer.
struct Pump {
    state: AppState,
    subscriber: Subscriber,
    tx: mpsc::Sender<Event>,
    stall: Duration,
    /// The subscription name, its slot generation and the slot's stop token.
    named: Option<(String, (u64, CancellationToken))>,
    permits: Arc<Semaphore>,
    service_filter: Option<String>,
}

impl Pump {
    async fn run(mut self) -> End {
        let state = self.state.clone();
        state.sse_clients().fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(crate::metrics::GATEWAY_SSE_CLIENTS).increment(1.0);
        let end = self.pump().await;
        state.sse_clients().fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(crate::metrics::GATEWAY_SSE_CLIENTS).decrement(1.0);
        if let Some((name, (generation, _))) = &self.named {
            self.state.inflight().close(name, *generation);
        }
        match &end {
            End::FellBehind => {
                metrics::counter!(crate::metrics::GATEWAY_FELL_BEHIND).increment(1);
                tracing::warn!(subscription = ?self.subscriber.name(), stall_ms = self.stall.as_millis() as u64, "gateway: SSE client fell behind; stream ended");
            }
            End::Failed(body) => {
                tracing::warn!(subscription = ?self.subscriber.name(), error = %body.message, "gateway: subscription failed")
            }
            End::Gone | End::Shutdown => {
                tracing::debug!(subscription = ?self.subscriber.name(), "gateway: subscriber disconnected")
            }
        }
        end
    }

    async fn pump(&mut self) -> End {
        let stop = self
            .named
            .as_ref()
            .map(|(_, (_, stop))| stop.clone())
            .unwrap_or_default();
        let gateway_stop = self.state.stop().clone();
        loop {
            let item = tokio::select! {
                item = self.subscriber.next() => item,
                _ = self.tx.closed() => return End::Gone,
                _ = stop.cancelled() => return End::Gone,
                _ = gateway_stop.cancelled() => return End::Shutdown,
            };
            let event = match item {
                None => return End::Shutdown,
                Some(Ok(delivery)) => match self.message(delivery, &stop).await {
                    Ok(Some(event)) => event,
                    Ok(None) => continue,
                    Err(end) => return end,
                },
                Some(Err(crate::Error::Lost { count, .. })) => Event::default()
                    .event("lost")
                    .json_data(StreamNotice {
                        code: "lost".into(),
                        message: format!("{count} message(s) expired before this subscriber read them; continuing with the oldest retained"),
                        count: Some(count),
                    })
                    .unwrap_or_default(),
                Some(Err(error)) if error.is_report() => continue,
                Some(Err(error)) => return End::Failed(ApiError::from(error).body()),
            };
            match tokio::time::timeout(self.stall, self.tx.send(event)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return End::Gone,
                Err(_) => return End::FellBehind,
            }
        }
    }

    /// The event of a delivery, or `None` when the monitor filter drops it. A named
    /// subscription's delivery is kept for its ack, within the in-flight limit.
    async fn message(
        &mut self,
        delivery: Delivery,
        stop: &CancellationToken,
    ) -> Result<Option<Event>, End> {
        if let Some(service) = &self.service_filter {
            if delivery.source_service != *service
                && delivery.dest_service.as_ref() != Some(service)
            {
                return Ok(None);
            }
        }
        let json = MessageJson::from(delivery.message());
        let event = Event::default()
            .event("message")
            .id(encode_position(delivery.position()))
            .json_data(&json)
            .map_err(|e| End::Failed(ApiError::Internal(e.to_string()).body()))?;
        if let Some(at) = delivery.at {
            self.state.latency().record(at);
        }
        if let Some((name, (generation, _))) = &self.named {
            let permit = tokio::select! {
                permit = Arc::clone(&self.permits).acquire_owned() => permit.map_err(|_| End::Shutdown)?,
                _ = self.tx.closed() => return Err(End::Gone),
                _ = stop.cancelled() => return Err(End::Gone),
            };
            self.state
                .inflight()
                .keep(name, *generation, delivery, permit);
        }
        Ok(Some(event))
    }
}

/// Parameters of an ack.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AckParams {
    /// The named subscription the message was delivered on.
    pub subscription: String,
}

/// The outcome of an ack.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Acked {
    /// The message id.
    pub id: String,
    /// The subscription.
    pub subscription: String,
}

/// Acknowledges a message delivered on a named subscription that is streaming now: the
/// subscription's checkpoint moves past it once every earlier delivery is acked too.
#[utoipa::path(
    post,
    path = "/ack/{messageId}",
    tag = "messages",
    security(("bearer" = [])),
    params(
        ("messageId" = String, Path, description = "The id of the delivered message"),
        AckParams,
    ),
    responses(
        (status = 200, description = "Acknowledged; the checkpoint is saved", body = Acked),
        (status = 400, description = "Bad parameters", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "The subscription belongs to another service", body = ErrorBody),
        (status = 404, description = "Not waiting for an ack on that subscription", body = ErrorBody),
    )
)]
pub(crate) async fn ack(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(params): Query<AckParams>,
) -> ApiResult<axum::Json<Acked>> {
    let service = caller.service()?;
    let delivery = state.inflight().take(&params.subscription, &id, service)?;
    delivery.ack().await?;
    Ok(axum::Json(Acked {
        id,
        subscription: params.subscription,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, Timestamp};

    #[test]
    fn positions_survive_the_event_id() {
        let position = Position::new(
            Timestamp {
                time: 1_795_500_000,
                increment: 7,
            },
            Some(doc! { "rt": { "_data": "8263A1F2" }, "ct": Timestamp { time: 1, increment: 2 } }),
        );
        let id = encode_position(&position);
        assert!(id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_eq!(decode_position(&id).unwrap(), position);
        assert!(decode_position("not an id").is_err());
        assert!(decode_position("AAAA").is_err());
    }
}
