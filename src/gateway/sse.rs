//! Following the bus over HTTP: `GET /subscribe/{topic}` as Server-Sent Events, and
//! `POST /ack/{messageId}`.
//!
//! Why it exists: a consumer in any language follows the bus with a plain HTTP GET.
//! Each SSE event's `id:` is the message's position in the medium, signed by the
//! gateway ([`EventKeys`](super::EventKeys)), so a client that reconnects with
//! `Last-Event-ID` (every SSE client does) resumes right after the last event it
//! received: no gap, whatever was published meanwhile, as long as the medium retains it.
//! An id the gateway did not issue (forged, altered, oversized, signed with another
//! key) or one ahead of the bus is refused with 400 `bad_event_id`.
//!
//! Events:
//! - `message`: a message ([`MessageJson`]), with the publisher's W3C trace context in
//!   `trace` when it had one;
//! - `lost`: messages expired before this subscriber read them (retention); the stream
//!   goes on with the oldest one retained (`count` is absent when the medium cannot
//!   tell how many);
//! - `lagged`: the client read so slowly that the gateway's buffer for it stayed full for
//!   [`GatewayOptions::sse_stall`](super::GatewayOptions): what was buffered for it is
//!   dropped, this event is sent instead (if the connection takes it), the stream ends,
//!   and the client resumes with `Last-Event-ID` (after the last event it received);
//! - `superseded`: another connection opened the same named subscription and took it
//!   over; this stream ends. A client that gets it must not reconnect (an
//!   `EventSource` reconnects by itself: close it), or the two connections take the
//!   name from each other in turn;
//! - `error`: the subscription failed; the stream ends.
//!
//! A slow client holds nobody up and costs bounded memory: each connection reads the
//! medium through its own cursor, at most [`GatewayOptions::sse_buffer`] events and
//! [`GatewayOptions::sse_buffer_bytes`] bytes ahead of what the connection has taken
//! (an event larger than that goes alone), beside what its socket buffers hold. A named subscription (`?name=`) keeps a checkpoint
//! in the medium, moved by `POST /ack/{messageId}?subscription=<name>`; at most
//! `max_in_flight` deliveries wait for an ack, or behind an unacked one (the checkpoint
//! passes only a run of acked deliveries), before the stream pauses. The saved
//! checkpoint wins over `Last-Event-ID` for a named subscription (the unacked ones come
//! again). A second connection with the same name takes over from the first.
//!
//! Names belong to the token's service: `?name=inbox` of `users` and `?name=inbox` of
//! `billing` are two subscriptions with two checkpoints, and one service can neither
//! resume from, ack into nor hold another's. In the medium (and in `/stats`) the
//! subscription is named [`scoped_name`]`(service, name)`, `users/inbox`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use utoipa::{IntoParams, ToSchema};

use super::auth::{Admin, AnyCaller, ServiceCaller};
use super::error::{ApiError, ApiResult, ErrorBody};
use super::event_id::BadEventId;
use super::extract::{Path, Query};
use super::limits::{too_many, Kind, OwnedHeld, TokenKey};
use super::model::MessageJson;
use super::outgoing::{Outgoing, Queued, Refused, Response};
use super::AppState;
use crate::delivery::{Delivery, Subscriber, Subscription};
use crate::filter::{Position, StartFrom};
use crate::message::{check_name, MAX_NAME_LEN};

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
    pub kind: Option<crate::message::MessageType>,
    /// Where to start without `Last-Event-ID` or checkpoint (default `now`).
    pub from: Option<Start>,
    /// Resume after this event id (for clients that cannot send `Last-Event-ID`).
    pub after: Option<String>,
    /// Every message on the bus, whatever its destination (admin tokens only).
    pub monitor: Option<bool>,
    /// With `monitor`: only messages from or to this service.
    pub service: Option<String>,
}

/// The data of a `lost`, `lagged`, `superseded` or `error` event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StreamNotice {
    /// `lost`, `fell_behind`, `superseded`, or an error code.
    pub code: String,
    /// What happened and what to do.
    pub message: String,
    /// For `lost`: how many messages, when the medium can tell (absent: an unknown
    /// number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

/// The name under which the gateway keeps the named subscription `name` of `service` in
/// the medium: `<service>/<name>`, with `%` and `/` in the service written `%25` and
/// `%2F`, so that the service ends at the first `/` and two (service, name) pairs
/// never make one name. 400 when `name` is not a valid name or the whole is over
/// [`MAX_NAME_LEN`] bytes.
pub(crate) fn scoped_name(service: &str, name: &str) -> ApiResult<String> {
    check_name("name", name)?;
    let scoped = format!("{}/{name}", service.replace('%', "%25").replace('/', "%2F"));
    if scoped.len() > MAX_NAME_LEN {
        return Err(ApiError::BadRequest(format!(
            "the subscription name is too long: `{scoped}` (the service, `/` and the name) must stay within {MAX_NAME_LEN} bytes"
        )));
    }
    check_name("subscription name", &scoped)?;
    Ok(scoped)
}

/// The deliveries of the named subscriptions streaming now, waiting for their acks,
/// by scoped name ([`scoped_name`]: the service and the name).
#[derive(Default)]
pub(crate) struct Inflight {
    slots: Mutex<HashMap<String, Slot>>,
    generation: AtomicU64,
}

struct Slot {
    generation: u64,
    stop: CancellationToken,
    deliveries: HashMap<String, Delivery>,
}

impl Inflight {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens the slot of a named subscription (a scoped name) for a new connection; a
    /// connection already streaming it (the same service's) is stopped.
    fn open(&self, scoped: &str) -> (u64, CancellationToken) {
        let mut slots = self.slots();
        if let Some(old) = slots.get(scoped) {
            old.stop.cancel();
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let stop = CancellationToken::new();
        slots.insert(
            scoped.to_string(),
            Slot {
                generation,
                stop: stop.clone(),
                deliveries: HashMap::new(),
            },
        );
        (generation, stop)
    }

    fn keep(&self, name: &str, generation: u64, delivery: Delivery) {
        if let Some(slot) = self.slots().get_mut(name) {
            if slot.generation == generation {
                slot.deliveries.insert(delivery.id.clone(), delivery);
            }
        }
    }

    fn close(&self, name: &str, generation: u64) {
        let mut slots = self.slots();
        if slots.get(name).is_some_and(|s| s.generation == generation) {
            slots.remove(name);
        }
    }

    /// The delivery `id` waiting on the subscription `scoped`, with the generation of
    /// the connection it came on; `name` is how the client calls it, for the message.
    fn take(&self, scoped: &str, name: &str, id: &str) -> ApiResult<(u64, Delivery)> {
        let mut slots = self.slots();
        let slot = slots.get_mut(scoped).ok_or_else(|| {
            ApiError::NotFound(format!(
                "subscription `{name}` of this token's service is not streaming: its unacked messages come again when it reconnects"
            ))
        })?;
        let generation = slot.generation;
        let delivery = slot.deliveries.remove(id).ok_or_else(|| {
                ApiError::NotFound(format!(
                    "message `{id}` is not waiting for an ack on `{name}` (acked already, or not delivered on this connection)"
                ))
            })?;
        Ok((generation, delivery))
    }
}

/// A subscription to every message on the bus, whatever its destination: for the admin
/// role only, which its argument proves.
fn monitor_subscription(_: Admin) -> Subscription {
    Subscription::monitor()
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
        (status = 200, description = "An event stream: `message` events (data: MessageJson, with the publisher's W3C trace context in `trace` when it had one; id: the position), `lost`, `lagged`, `superseded` and `error` notices (data: StreamNotice)", content_type = "text/event-stream", body = String),
        (status = 400, description = "A bad parameter; `bad_event_id`: a Last-Event-ID (or `after`) this gateway did not issue, or ahead of the bus", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A token without a service (a named `monitor` subscription needs one too); `monitor` without admin", body = ErrorBody),
        (status = 429, description = "`too_many_requests`: this token holds its share of SSE streams (`max_sse_per_token`)", body = ErrorBody),
        (status = 503, description = "`busy`: as many SSE streams are open as the gateway allows (`max_sse_clients`, less `sse_admin_reserve` for service tokens); try again later", body = ErrorBody),
    )
)]
pub(crate) async fn subscribe(
    State(state): State<AppState>,
    caller: AnyCaller,
    token: Option<axum::Extension<TokenKey>>,
    headers: HeaderMap,
    Path(topic): Path<String>,
    Query(params): Query<SubscribeParams>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>>> {
    let token = token.map(|axum::Extension(key)| key);
    let monitor = params.monitor.unwrap_or(false);
    // The role depends on the request: a monitor needs the admin role, any other
    // subscription a service.
    let (service, mut subscription) = if monitor {
        let admin = caller.to_admin()?;
        let service = caller.identity().service.clone();
        (
            service.unwrap_or_else(|| state.bus().service().to_string()),
            monitor_subscription(admin),
        )
    } else {
        (
            caller.to_service()?.service().to_string(),
            Subscription::new(),
        )
    };
    if topic != "*" {
        check_name("topic", &topic)?;
        subscription = subscription.actions([topic.clone()]);
    }
    if let Some(source) = &params.source {
        subscription = subscription.sources([source.clone()]);
    }
    if let Some(kind) = params.kind {
        subscription = subscription.types([kind]);
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
        (Some(id), _) => StartFrom::After(resume_position(&state, id)?),
        (None, Start::Beginning) => StartFrom::Beginning,
        (None, Start::Now) => StartFrom::Now,
    });
    let named = match &params.name {
        Some(name) => {
            // The checkpoint belongs to the token's service (an admin token without a
            // service has none to keep it under).
            let own = caller.to_service()?;
            let own = own.service();
            let scoped = scoped_name(own, name)?;
            // Clients choose names at will: the metrics count them by service.
            subscription = subscription
                .with_name(&scoped)
                .metrics_label(format!("gateway:{own}"));
            Some(scoped)
        }
        None => None,
    };
    let instance = params.instance.as_deref();
    let bus = state.bus().as_service(&service, instance)?;
    // Counted from here (before the response goes out, so that a client sees itself in
    // /stats); uncounted if the stream does not start, and by the pump when it ends.
    let options = state.options();
    let counted = ClientCount::take(&state, &caller, token)?;
    let opened = bson::DateTime::now();
    let slot = named.as_ref().map(|name| state.inflight().open(name));
    // Closed if the subscription fails, or if the client goes away while it is made (the
    // handler's future is dropped at the await): names are the clients' to choose.
    let mut opened_slot = SlotGuard {
        state: &state,
        slot: named
            .clone()
            .zip(slot.as_ref().map(|(generation, _)| *generation)),
    };
    let subscriber = bus.subscribe(subscription).await?;
    // From here the pump owns the slot (it closes it when the stream ends).
    opened_slot.slot = None;
    tracing::info!(service, topic, subscription = ?params.name, monitor, resumed = last_event_id.is_some(), "gateway: subscriber connected");
    let outgoing = Outgoing::new(state.clone(), options.sse_buffer, options.sse_buffer_bytes);
    // From here the pump uncounts the stream when it ends.
    let held = counted.keep();
    let pump = Pump {
        state: state.clone(),
        subscriber,
        outgoing: Arc::clone(&outgoing),
        stall: options.sse_stall,
        named: named.zip(slot),
        max_in_flight: options.max_in_flight.max(1),
        service_filter: params.service.clone().filter(|_| monitor),
        opened,
        _held: held,
    };
    tokio::spawn(pump.run());
    let events = Response::new(outgoing).into_stream();
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(options.keep_alive)))
}

/// The position a client resumes after: its event id, verified ([`EventKeys`]), and
/// not ahead of the gateway's clock by more than [`AHEAD_TOLERANCE`] (a bus whose data
/// was reset under a client that still holds ids of it: resuming after such an id would
/// wait, silent, until the bus's stamps pass it).
///
/// [`EventKeys`]: super::EventKeys
fn resume_position(state: &AppState, id: &str) -> ApiResult<Position> {
    let position = state.event_keys().verify(id).map_err(|e| {
        metrics::counter!(crate::metrics::GATEWAY_LIMITED, "limit" => "bad_event_id").increment(1);
        let what = match e {
            BadEventId::Forged => "forged",
            BadEventId::TooLong(_) => "too long",
            _ => "malformed",
        };
        tracing::debug!(what, "gateway: event id refused");
        ApiError::BadEventId(format!(
            "Last-Event-ID (or after=) refused: {e}; subscribe again without it (from=now or from=beginning, or by a named subscription's checkpoint)"
        ))
    })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if u64::from(position.ts.time) > now + AHEAD_TOLERANCE.as_secs() {
        return Err(ApiError::BadEventId(format!(
            "Last-Event-ID is ahead of the bus: its stamp ({} s) is later than the gateway's clock ({now} s) by more than {} s; the bus was reset since the id was issued: subscribe again without it (from=beginning)",
            position.ts.time,
            AHEAD_TOLERANCE.as_secs()
        )));
    }
    Ok(position)
}

/// How far ahead of the gateway's clock an event id's stamp may be (server clocks drift).
pub(crate) const AHEAD_TOLERANCE: Duration = Duration::from_secs(300);

/// One SSE stream counted in `sse_clients` (and in its token's share), uncounted on drop
/// unless the pump took it over ([`ClientCount::keep`]).
struct ClientCount<'a> {
    state: &'a AppState,
    /// Counted in the gauge too (the limit was not reached).
    gauged: bool,
    kept: bool,
    held: Option<super::limits::Held<'a>>,
}

impl<'a> ClientCount<'a> {
    /// Counts a stream: 503 `busy` when the gateway has `max_sse_clients` open (a service
    /// token already at `max_sse_clients - sse_admin_reserve`), 429 when the token holds
    /// its share.
    fn take(state: &'a AppState, caller: &AnyCaller, token: Option<TokenKey>) -> ApiResult<Self> {
        let options = state.options();
        let max = options.max_sse_clients;
        let open = state.sse_clients().fetch_add(1, Ordering::AcqRel);
        let mut counted = ClientCount {
            state,
            gauged: false,
            kept: false,
            held: None,
        };
        let cap = if caller.identity().admin {
            max
        } else {
            max.saturating_sub(options.sse_admin_reserve).max(1)
        };
        if open >= cap {
            metrics::counter!(crate::metrics::GATEWAY_LIMITED, "limit" => "max_sse_clients")
                .increment(1);
            return Err(ApiError::Busy(format!(
                "{open} SSE streams are open, the gateway's limit for this token (max_sse_clients = {max}, of which sse_admin_reserve = {} for admin tokens): try again later",
                options.sse_admin_reserve
            )));
        }
        if let Some(token) = token {
            let per_token = options.max_sse_per_token;
            counted.held = Some(
                state
                    .tokens_in_use()
                    .take(token, Kind::Stream, per_token)
                    .map_err(|held| {
                        too_many("SSE streams", held, per_token, "max_sse_per_token")
                    })?,
            );
        }
        metrics::gauge!(crate::metrics::GATEWAY_SSE_CLIENTS).increment(1.0);
        counted.gauged = true;
        Ok(counted)
    }

    /// Hands the count to the pump; what it returns holds the token's share.
    fn keep(mut self) -> Option<OwnedHeld> {
        self.kept = true;
        self.held.take().map(|held| held.into_owned(self.state))
    }
}

impl Drop for ClientCount<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.state.sse_clients().fetch_sub(1, Ordering::AcqRel);
            if self.gauged {
                metrics::gauge!(crate::metrics::GATEWAY_SSE_CLIENTS).decrement(1.0);
            }
        }
    }
}

/// A stream of the medium routes (`POST /medium/follow`), counted against the
/// gateway's SSE limits for as long as it is held.
pub(crate) struct CountedStream {
    state: AppState,
    _held: Option<OwnedHeld>,
}

impl Drop for CountedStream {
    fn drop(&mut self) {
        self.state.sse_clients().fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!(crate::metrics::GATEWAY_SSE_CLIENTS).decrement(1.0);
    }
}

/// Counts a stream of the medium routes as [`ClientCount::take`] counts a subscriber's.
pub(crate) fn count_stream(
    state: &AppState,
    caller: &AnyCaller,
    token: Option<TokenKey>,
) -> ApiResult<CountedStream> {
    let held = ClientCount::take(state, caller, token)?.keep();
    Ok(CountedStream {
        state: state.clone(),
        _held: held,
    })
}

/// Closes the slot of a named subscription whose stream did not start.
struct SlotGuard<'a> {
    state: &'a AppState,
    /// The scoped name and the slot's generation, until the pump owns them.
    slot: Option<(String, u64)>,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        if let Some((name, generation)) = self.slot.take() {
            self.state.inflight().close(&name, generation);
        }
    }
}

/// Why a stream ended.
enum End {
    /// The client went away.
    Gone,
    /// A newer connection took the subscription's name over.
    Superseded,
    /// The client left its buffer full for the stall time.
    FellBehind,
    /// The subscription failed.
    Failed(ErrorBody),
    /// The bus or the gateway shut down.
    Shutdown,
}

/// An event whose data is a [`StreamNotice`].
fn notice(event: &str, notice: &StreamNotice) -> Queued {
    Queued::new(
        event,
        None,
        serde_json::to_string(notice).unwrap_or_else(|_| "{}".into()),
    )
}

/// The notice of a `lost` event: `count` is 0 when the medium cannot tell how many.
fn lost_notice(count: u64) -> StreamNotice {
    let (message, count) = match count {
        0 => ("an unknown number of messages expired before this subscriber read them; continuing with the oldest retained".to_string(), None),
        n => (format!("{n} message(s) expired before this subscriber read them; continuing with the oldest retained"), Some(n)),
    };
    StreamNotice {
        code: "lost".into(),
        message,
        count,
    }
}

impl End {
    /// The last event of the stream, and whether it replaces what is still queued.
    fn last(&self, subscription: Option<&str>) -> (Option<Queued>, bool) {
        match self {
            End::Gone | End::Shutdown => (None, false),
            End::FellBehind => (
                Some(notice(
                    "lagged",
                    &StreamNotice {
                        code: "fell_behind".into(),
                        message: "this client read too slowly and fell behind: what was buffered for it is dropped; reconnect with Last-Event-ID to resume after the last event it received".into(),
                        count: None,
                    },
                )),
                true,
            ),
            End::Superseded => (
                Some(notice(
                    "superseded",
                    &StreamNotice {
                        code: "superseded".into(),
                        message: format!(
                            "another connection took subscription `{}` over: this one ends; do not reconnect it (close the EventSource), or the two take the name from each other in turn",
                            subscription.unwrap_or_default()
                        ),
                        count: None,
                    },
                )),
                // Its deliveries cannot be acked any more: they come again on the new
                // connection.
                true,
            ),
            End::Failed(body) => (
                Some(notice(
                    "error",
                    &StreamNotice {
                        code: body.code.clone(),
                        message: body.message.clone(),
                        count: None,
                    },
                )),
                false,
            ),
        }
    }
}

/// Reads one connection's subscription into its bounded queue.
struct Pump {
    state: AppState,
    subscriber: Subscriber,
    outgoing: Arc<Outgoing>,
    stall: Duration,
    /// The subscription name, its slot generation and the slot's stop token.
    named: Option<(String, (u64, CancellationToken))>,
    /// How many deliveries of a named subscription may wait for an ack, or behind an
    /// unacked one, before the stream pauses.
    max_in_flight: usize,
    service_filter: Option<String>,
    /// When the client connected (this process's clock): deliveries stamped before
    /// are backlog (a replay), not live, and their age is not a latency.
    opened: bson::DateTime,
    /// The token's share this stream holds, given back when the pump ends.
    _held: Option<OwnedHeld>,
}

impl Pump {
    /// Pumps until the stream ends, then says why; the stream was counted in
    /// `sse_clients` by `subscribe`.
    async fn run(mut self) {
        let state = self.state.clone();
        let end = self.pump().await;
        state.sse_clients().fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(crate::metrics::GATEWAY_SSE_CLIENTS).decrement(1.0);
        if let Some((name, (generation, _))) = &self.named {
            self.state.inflight().close(name, *generation);
        }
        let subscription = self.subscriber.name();
        match &end {
            End::FellBehind => {
                metrics::counter!(crate::metrics::GATEWAY_FELL_BEHIND).increment(1);
                tracing::warn!(subscription, stall_ms = self.stall.as_millis() as u64, "gateway: SSE client fell behind; what was buffered for it is dropped and its stream ends");
            }
            End::Failed(body) => {
                tracing::warn!(subscription, error = %body.message, "gateway: subscription failed")
            }
            End::Superseded => {
                tracing::info!(
                    subscription,
                    "gateway: named subscription taken over by a newer connection"
                )
            }
            End::Gone | End::Shutdown => {
                tracing::debug!(subscription, "gateway: subscriber disconnected")
            }
        }
        let (last, discard) = end.last(subscription);
        self.outgoing.end(last, discard);
    }

    async fn pump(&mut self) -> End {
        let stop = self
            .named
            .as_ref()
            .map(|(_, (_, stop))| stop.clone())
            .unwrap_or_default();
        let gateway_stop = self.state.stop().clone();
        let gone = self.outgoing.gone().clone();
        loop {
            let item = tokio::select! {
                item = self.subscriber.next() => item,
                _ = gone.cancelled() => return End::Gone,
                _ = stop.cancelled() => return End::Superseded,
                _ = gateway_stop.cancelled() => return End::Shutdown,
            };
            let queued = match item {
                None => return End::Shutdown,
                Some(Ok(delivery)) => match self.message(delivery, &stop, &gateway_stop).await {
                    Ok(Some(queued)) => queued,
                    Ok(None) => continue,
                    Err(end) => return end,
                },
                Some(Err(crate::Error::Lost { count, .. })) => notice("lost", &lost_notice(count)),
                Some(Err(error)) if error.is_report() => continue,
                Some(Err(error)) => return End::Failed(ApiError::from(error).body()),
            };
            match self.outgoing.push(queued, self.stall).await {
                Ok(()) => {}
                Err(Refused::Gone) => return End::Gone,
                Err(Refused::Full) => return End::FellBehind,
            }
        }
    }

    /// The event of a delivery, or `None` when the monitor filter drops it (a named
    /// subscription's checkpoint passes it). A named subscription's delivery is kept
    /// for its ack, once at most `max_in_flight` deliveries (this one included) wait
    /// for an ack or behind an unacked one: the checkpoint only passes a run of acked
    /// deliveries, and a client that leaves one unacked holds the ones after it.
    async fn message(
        &mut self,
        delivery: Delivery,
        stop: &CancellationToken,
        gateway_stop: &CancellationToken,
    ) -> Result<Option<Queued>, End> {
        if let Some(service) = &self.service_filter {
            if delivery.source_service != *service
                && delivery.dest_service.as_ref() != Some(service)
            {
                delivery.pass();
                return Ok(None);
            }
        }
        let json = MessageJson::from(delivery.message());
        let data = serde_json::to_string(&json)
            .map_err(|e| End::Failed(ApiError::Internal(e.to_string()).body()))?;
        let id = self.state.event_keys().sign(delivery.compact_position());
        let mut queued = Queued::new("message", Some(id), data);
        // Latency is measured on live deliveries only: a message stamped before the
        // client connected is backlog (a replay after Last-Event-ID, a checkpoint or
        // from=beginning), and its age says nothing of the bus's speed.
        queued.stamp = delivery.at.filter(|at| *at >= self.opened);
        if let Some((name, (generation, _))) = &self.named {
            let gone = self.outgoing.gone();
            tokio::select! {
                () = self.subscriber.in_flight_at_most(self.max_in_flight) => {}
                _ = gone.cancelled() => return Err(End::Gone),
                _ = stop.cancelled() => return Err(End::Superseded),
                _ = gateway_stop.cancelled() => return Err(End::Shutdown),
            }
            self.state.inflight().keep(name, *generation, delivery);
        }
        Ok(Some(queued))
    }
}

/// Parameters of an ack.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AckParams {
    /// The named subscription the message was delivered on (the `name` it was opened
    /// with: the token's service is implied).
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
        (status = 403, description = "A token without a service", body = ErrorBody),
        (status = 404, description = "Not waiting for an ack on that subscription of the token's service", body = ErrorBody),
        (status = 503, description = "`unavailable`: the ack is recorded but the checkpoint could not be saved; ack again to save it", body = ErrorBody),
    )
)]
pub(crate) async fn ack(
    State(state): State<AppState>,
    caller: ServiceCaller,
    Path(id): Path<String>,
    Query(params): Query<AckParams>,
) -> ApiResult<axum::Json<Acked>> {
    let scoped = scoped_name(caller.service(), &params.subscription)?;
    let (generation, delivery) = state.inflight().take(&scoped, &params.subscription, &id)?;
    if let Err(error) = delivery.ack_kept().await {
        // The ack is recorded, its checkpoint not saved: the delivery waits again on its
        // connection, so that the client's retry saves it (not "not waiting: 404").
        state.inflight().keep(&scoped, generation, delivery);
        return Err(error.into());
    }
    Ok(axum::Json(Acked {
        id,
        subscription: params.subscription,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loss_of_unknown_size_is_not_called_zero() {
        let unknown = lost_notice(0);
        assert_eq!(unknown.count, None);
        assert!(unknown.message.contains("an unknown number"), "{unknown:?}");
        assert!(!unknown.message.contains('0'), "{unknown:?}");
        let known = lost_notice(20);
        assert_eq!(known.count, Some(20));
        assert!(known.message.starts_with("20 message(s)"), "{known:?}");
    }
}
