//! The gateway's medium over HTTP (`/medium/...`): the operations of the medium under
//! the gateway's bus, one route each, for a bus whose medium is this gateway
//! (`common.intracom.medium=http`, feature `http`).
//!
//! Why it exists: a service that cannot reach the database or the broker itself (or a
//! fleet too large for one change stream per process) attaches through gateways. The
//! bus-level routes (`/publish`, `/subscribe`) apply the bus's own rules; a remote bus
//! applies those itself and needs the medium's operations underneath: append with the
//! stamps returned, follow from a position with a filter, checkpoints, claims and
//! leases, idempotency records, dead letters.
//!
//! Documents, messages and positions travel as canonical extended JSON. A follower is
//! an event stream (`POST /medium/follow`) whose `message` events carry the message and
//! the position after it (also the event's id), so that a client resumes from the last
//! one it read, on this gateway or on another one of the same database. A follower
//! from now gets an `anchor` event first (the place after every message the medium
//! held before it started), where it resumes before it has read a message.
//!
//! Roles: an admin token acts for any service (a bus with many services, an operator).
//! A service token acts as its service only: it appends messages its service sends,
//! under the catalog; follows what its service receives (a monitor needs admin); adds
//! only its own actions to the catalog (what is already declared passes); claims its
//! service's work, under owners scoped to its service (`<service>/<owner>`), and renews,
//! settles and buries only under those owners (a settle without an owner, an asker's
//! time-out, only for work its service sent or is sent); reads the outcomes of its
//! service's requests only; and its checkpoints and idempotency records live under names scoped
//! to its service (`<service>/<name>`). Listing, reading and removing dead letters and
//! the inspections are admin routes.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::{Stream, StreamExt};

use super::auth::{Admin, AnyCaller};
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::Json;
use super::limits::TokenKey;
use super::sse::scoped_name;
use super::AppState;
use crate::medium::wire::{self, *};
use crate::medium::{ClaimRequest, Event, Medium};
use crate::message::check_name;

/// The longest lease, back-off or record lease a client may ask for (a day): longer
/// would hold work past any sensible failure.
const MAX_LEASE_MS: u64 = 86_400_000;

/// Who the caller acts for.
struct Acting {
    /// `None`: an admin token, for any service.
    service: Option<String>,
}

impl Acting {
    fn of(caller: &AnyCaller) -> ApiResult<Self> {
        if caller.identity().admin {
            return Ok(Acting { service: None });
        }
        Ok(Acting {
            service: Some(caller.to_service()?.service().to_string()),
        })
    }

    /// 403 unless the caller may act for `service`.
    fn may_act_for(&self, service: &str, what: &str) -> ApiResult<()> {
        match &self.service {
            Some(own) if own != service => Err(ApiError::Forbidden(format!(
                "a token of `{own}` may not {what} for `{service}`"
            ))),
            _ => Ok(()),
        }
    }

    /// The owner of a claim made through these routes: scoped to the caller's service
    /// for a service token (`<service>/<owner>`), so that no other service's token can
    /// name the owner of a lease it does not hold.
    fn owner(&self, owner: &str) -> ApiResult<String> {
        self.scoped("owner", owner)
    }

    /// A name the caller keeps in the medium (checkpoint, consumer): scoped to its
    /// service for a service token, as it is for an admin.
    fn scoped(&self, field: &str, name: &str) -> ApiResult<String> {
        check_name(field, name)?;
        match &self.service {
            Some(own) => scoped_name(own, name),
            None => Ok(name.to_string()),
        }
    }
}

fn medium(state: &AppState) -> &dyn Medium {
    &**state.bus().medium()
}

fn ms(value: u64, field: &str, max: u64) -> ApiResult<Duration> {
    if value > max {
        return Err(ApiError::BadRequest(format!(
            "{field} must be at most {max}, not {value}"
        )));
    }
    Ok(Duration::from_millis(value))
}

/// What the gateway's medium is and does.
#[utoipa::path(
    get,
    path = "/medium",
    tag = "medium",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The medium's name, limit, capabilities and abilities", body = MediumInfo),
        (status = 401, description = "No valid token", body = ErrorBody),
    )
)]
pub(crate) async fn info(
    State(state): State<AppState>,
    _caller: AnyCaller,
) -> ApiResult<axum::Json<MediumInfo>> {
    let medium = medium(&state);
    let capabilities = medium.capabilities();
    let work = medium.work().is_some() && capabilities.stored_queue;
    Ok(axum::Json(MediumInfo {
        medium: medium.name().to_string(),
        // What one append may carry: the medium's limit, within the gateway's own
        // (its request bodies are refused over it).
        max_message_bytes: medium.max_message_bytes().min(
            state
                .options()
                .max_body_bytes
                .unwrap_or(state.bus().config().max_message_bytes),
        ) as u64,
        capabilities: capabilities.into(),
        work,
        dead_letters: medium.dead_letter_store().is_some(),
        records: medium.records().is_some(),
        inspection: medium.inspection().is_some(),
        anchors: true,
    }))
}

/// Stamps and stores messages, in order; ids already stored are duplicates.
#[utoipa::path(
    post,
    path = "/medium/append",
    tag = "medium",
    security(("bearer" = [])),
    request_body = AppendJson,
    responses(
        (status = 200, description = "One outcome per message, in order", body = [AppendedJson]),
        (status = 400, description = "A message that is not one", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A message another service sends (service tokens), or one the catalog does not declare", body = ErrorBody),
        (status = 413, description = "A message over the medium's limit", body = ErrorBody),
        (status = 503, description = "The medium is unavailable", body = ErrorBody),
    )
)]
pub(crate) async fn append(
    State(state): State<AppState>,
    caller: AnyCaller,
    Json(request): Json<AppendJson>,
) -> ApiResult<axum::Json<Vec<AppendedJson>>> {
    let acting = Acting::of(&caller)?;
    let medium = medium(&state);
    let limit = medium.max_message_bytes();
    let mut messages = Vec::with_capacity(request.messages.len());
    for value in request.messages {
        let message = wire::message_of(value)?;
        message.validate()?;
        acting.may_act_for(&message.source_service, "send")?;
        if acting.service.is_some() {
            state.bus().catalog().check(&message).await?;
        }
        let size = message.encoded_len()?;
        if size > limit {
            return Err(crate::Error::TooLarge {
                id: message.id.clone(),
                size,
                limit,
            }
            .into());
        }
        messages.push(message);
    }
    let appended = medium.append(&messages).await?;
    Ok(axum::Json(
        appended
            .into_iter()
            .map(|a| AppendedJson {
                id: a.id,
                ts: a.ts.map(wire::ext_of_ts),
                duplicate: a.duplicate,
            })
            .collect(),
    ))
}

/// Follows the messages matching a filter from a start point, as Server-Sent Events:
/// from now, `anchor` first (data: the position after every message the medium held
/// before the follower started, where a client resumes if the stream breaks before it
/// read a message; `null` when the medium cannot name it);
/// `message` (data: the message and the position after it; id: that position),
/// `lost` (data: how many expired unread), `error` (an error of the medium; the stream
/// goes on).
#[utoipa::path(
    post,
    path = "/medium/follow",
    tag = "medium",
    security(("bearer" = [])),
    request_body = FollowJson,
    responses(
        (status = 200, description = "The event stream", content_type = "text/event-stream", body = FollowedJson),
        (status = 400, description = "A bad position or name", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A filter for another service, or a monitor (no service) without admin", body = ErrorBody),
        (status = 429, description = "This token holds its share of streams", body = ErrorBody),
        (status = 503, description = "As many streams are open as the gateway allows, or the medium is unavailable", body = ErrorBody),
    )
)]
pub(crate) async fn follow(
    State(state): State<AppState>,
    caller: AnyCaller,
    token: Option<axum::Extension<TokenKey>>,
    Json(mut request): Json<FollowJson>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>>> {
    let acting = Acting::of(&caller)?;
    match (&acting.service, &request.filter.service) {
        (Some(own), None) => {
            return Err(ApiError::Forbidden(format!(
                "a token of `{own}` follows its own service's messages only: a monitor needs an admin token"
            )))
        }
        (Some(_), Some(service)) => acting.may_act_for(service, "follow")?,
        (None, _) => {}
    }
    let start = request.start()?;
    let name = request
        .name
        .as_deref()
        .map(|name| acting.scoped("name", name))
        .transpose()?;
    let filter: crate::Filter = request.filter.into();
    let counted = super::sse::count_stream(&state, &caller, token.map(|t| t.0))?;
    let medium = medium(&state);
    // Taken before the follower starts: every message after it is the follower's, or
    // was appended before the follower's own anchor (and before this answer).
    let anchor = match start {
        crate::StartFrom::Now => {
            let position = medium.anchor_now().await?;
            let data = AnchorJson {
                position: position.as_ref().map(wire::ext_of_position),
            };
            Some(Ok(SseEvent::default().event("anchor").data(json(&data))))
        }
        _ => None,
    };
    let events = match &name {
        Some(name) => medium.follow_durable(name, start, filter).await?,
        None => medium.follow(start, filter).await?,
    };
    let stop = state.stop().clone();
    let events = events.take_until(stop.cancelled_owned()).map(move |item| {
        let _counted = &counted;
        Ok(event_of(item))
    });
    let stream = futures::stream::iter(anchor).chain(events);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(state.options().keep_alive)))
}

/// One follower's event as an SSE event.
fn event_of(item: crate::Result<Event>) -> SseEvent {
    match item {
        Ok(Event::Message(message, position)) => {
            // Without the window's ids: a follower over a gateway does not hold them for
            // every event (a restart through a gateway whose server lost the window's
            // history may deliver some again).
            let position = wire::ext_of_position(position.compact());
            match wire::ext_of_message(&message) {
                Ok(message) => {
                    let id = position.to_string();
                    let data = FollowedJson { message, position };
                    SseEvent::default()
                        .event("message")
                        .id(id)
                        .data(json(&data))
                }
                Err(error) => error_event(&error),
            }
        }
        Ok(Event::Lost { count }) => SseEvent::default()
            .event("lost")
            .data(json(&LostJson { count })),
        Err(error) => error_event(&error),
    }
}

fn error_event(error: &crate::Error) -> SseEvent {
    let api = ApiError::Bus(clone_error(error));
    SseEvent::default().event("error").data(json(&api.body()))
}

/// An error as the client will rebuild it: its code and message are what travels.
fn clone_error(error: &crate::Error) -> crate::Error {
    use crate::Error as E;
    match error {
        E::Unavailable { medium, reason, .. } => E::unavailable(medium, reason.clone()),
        E::Shutdown => E::Shutdown,
        other => E::refused("http", other.to_string()),
    }
}

/// An event's data as JSON (these shapes always encode: strings, numbers, and JSON
/// values made from documents).
fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// The whole catalog of the medium: service → actions.
#[utoipa::path(
    get,
    path = "/medium/catalog",
    tag = "medium",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Service → actions", body = BTreeMap<String, Vec<String>>),
        (status = 401, description = "No valid token", body = ErrorBody),
    )
)]
pub(crate) async fn catalog_load(
    State(state): State<AppState>,
    _caller: AnyCaller,
) -> ApiResult<axum::Json<BTreeMap<String, Vec<String>>>> {
    let catalog = medium(&state).catalog_load().await?;
    Ok(axum::Json(
        catalog
            .into_iter()
            .map(|(service, actions)| (service, actions.into_iter().collect()))
            .collect(),
    ))
}

/// Adds a service and actions to the catalog (a union with what is there). A service
/// token adds its own service's actions; for another service, only what is declared
/// already (a no-op) passes.
#[utoipa::path(
    post,
    path = "/medium/catalog",
    tag = "medium",
    security(("bearer" = [])),
    request_body = CatalogAddJson,
    responses(
        (status = 204, description = "Added"),
        (status = 400, description = "A bad name", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Actions of another service (service tokens)", body = ErrorBody),
    )
)]
pub(crate) async fn catalog_add(
    State(state): State<AppState>,
    caller: AnyCaller,
    Json(request): Json<CatalogAddJson>,
) -> ApiResult<axum::http::StatusCode> {
    let acting = Acting::of(&caller)?;
    check_name("service", &request.service)?;
    for action in &request.actions {
        check_name("action", action)?;
    }
    let medium = medium(&state);
    if acting.may_act_for(&request.service, "declare").is_err() {
        let catalog = medium.catalog_load().await?;
        let declared = catalog.get(&request.service);
        let known = request
            .actions
            .iter()
            .all(|a| declared.is_some_and(|d| d.contains(a)));
        if !known {
            acting.may_act_for(&request.service, "declare actions")?;
        }
        return Ok(axum::http::StatusCode::NO_CONTENT);
    }
    medium
        .catalog_add(&request.service, &request.actions)
        .await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// The last saved position of a named subscription (`position` absent: none).
#[utoipa::path(
    post,
    path = "/medium/checkpoint/load",
    tag = "medium",
    security(("bearer" = [])),
    request_body = CheckpointJson,
    responses(
        (status = 200, description = "The checkpoint", body = CheckpointJson),
        (status = 400, description = "A bad name", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A token without a service or admin", body = ErrorBody),
    )
)]
pub(crate) async fn checkpoint_load(
    State(state): State<AppState>,
    caller: AnyCaller,
    Json(request): Json<CheckpointJson>,
) -> ApiResult<axum::Json<CheckpointJson>> {
    let acting = Acting::of(&caller)?;
    let name = acting.scoped("name", &request.name)?;
    let position = medium(&state).checkpoint_load(&name).await?;
    Ok(axum::Json(CheckpointJson {
        name: request.name,
        position: position.as_ref().map(wire::ext_of_position),
    }))
}

/// Saves the position of a named subscription.
#[utoipa::path(
    post,
    path = "/medium/checkpoint/save",
    tag = "medium",
    security(("bearer" = [])),
    request_body = CheckpointJson,
    responses(
        (status = 204, description = "Saved"),
        (status = 400, description = "A bad name or position", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A token without a service or admin", body = ErrorBody),
    )
)]
pub(crate) async fn checkpoint_save(
    State(state): State<AppState>,
    caller: AnyCaller,
    Json(request): Json<CheckpointJson>,
) -> ApiResult<axum::http::StatusCode> {
    let acting = Acting::of(&caller)?;
    let name = acting.scoped("name", &request.name)?;
    let position = request
        .position
        .ok_or_else(|| ApiError::BadRequest("a checkpoint to save needs a position".into()))
        .and_then(|p| Ok(wire::position_of(p)?))?;
    medium(&state).checkpoint_save(&name, &position).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

fn work(state: &AppState) -> ApiResult<&dyn crate::medium::WorkQueue> {
    let medium = medium(state);
    if !medium.capabilities().stored_queue {
        return Err(crate::medium::unsupported(
            medium.name(),
            "work claimed over the gateway (its medium pushes work to workers)",
        )
        .into());
    }
    Ok(medium.work_or_unsupported()?)
}

fn maybe_message(message: Option<crate::Message>) -> ApiResult<axum::Json<MaybeMessageJson>> {
    Ok(axum::Json(MaybeMessageJson {
        message: message.as_ref().map(wire::ext_of_message).transpose()?,
    }))
}

/// Claims the next available work of a service (a service token: its own).
#[utoipa::path(
    post,
    path = "/medium/work/claim",
    tag = "medium",
    security(("bearer" = [])),
    request_body = ClaimJson,
    responses(
        (status = 200, description = "The claimed message, or none", body = MaybeMessageJson),
        (status = 400, description = "A bad name or lease", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Another service's work (service tokens)", body = ErrorBody),
        (status = 501, description = "The medium keeps no queue to claim from", body = ErrorBody),
    )
)]
pub(crate) async fn claim(
    State(state): State<AppState>,
    caller: AnyCaller,
    Json(request): Json<ClaimJson>,
) -> ApiResult<axum::Json<MaybeMessageJson>> {
    let acting = Acting::of(&caller)?;
    check_name("service", &request.service)?;
    for action in &request.actions {
        check_name("action", action)?;
    }
    let owner = acting.owner(&request.owner)?;
    acting.may_act_for(&request.service, "claim work")?;
    let lease = ms(request.lease_ms, "lease_ms", MAX_LEASE_MS)?;
    let claim = ClaimRequest::new(request.service, request.actions, owner, lease);
    maybe_message(work(&state)?.claim(&claim).await?)
}

/// Extends a lease the owner still holds (`done`: false when it lost it).
#[utoipa::path(
    post,
    path = "/medium/work/renew",
    tag = "medium",
    security(("bearer" = [])),
    request_body = RenewJson,
    responses(
        (status = 200, description = "Whether the lease was extended", body = DoneJson),
        (status = 400, description = "A bad id or lease", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A token without a service or admin", body = ErrorBody),
    )
)]
pub(crate) async fn renew(
    State(state): State<AppState>,
    caller: AnyCaller,
    Json(request): Json<RenewJson>,
) -> ApiResult<axum::Json<DoneJson>> {
    let acting = Acting::of(&caller)?;
    check_name("id", &request.id)?;
    let owner = acting.owner(&request.owner)?;
    let lease = ms(request.lease_ms, "lease_ms", MAX_LEASE_MS)?;
    let done = work(&state)?.renew(&request.id, &owner, lease).await?;
    Ok(axum::Json(DoneJson { done }))
}

/// Ends claimed work: with an owner, while it holds the lease; without, while the work
/// is pending (a caller's time-out).
#[utoipa::path(
    post,
    path = "/medium/work/settle",
    tag = "medium",
    security(("bearer" = [])),
    request_body = SettleJson,
    responses(
        (status = 200, description = "Whether it was settled", body = DoneJson),
        (status = 400, description = "A bad id or settlement", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A token without a service or admin, or an owner-less settle of work neither from nor to the token's service", body = ErrorBody),
    )
)]
pub(crate) async fn settle(
    State(state): State<AppState>,
    caller: AnyCaller,
    Json(request): Json<SettleJson>,
) -> ApiResult<axum::Json<DoneJson>> {
    let acting = Acting::of(&caller)?;
    check_name("id", &request.id)?;
    let owner = request
        .owner
        .as_deref()
        .map(|owner| acting.owner(owner))
        .transpose()?;
    if let SettlementJson::Retry { after_ms, .. } = &request.settlement {
        ms(*after_ms, "after_ms", MAX_LEASE_MS)?;
    }
    let settlement = request.settlement.into_settlement()?;
    let work = work(&state)?;
    if let (None, Some(own)) = (&owner, &acting.service) {
        // Without an owner, a settle holds while the work is pending: the asker's
        // time-out or abandon mark. A service token marks only work its service sent or
        // is sent.
        let concerns = match work.work_services(&request.id).await? {
            Some((source, dest)) => &source == own || dest.as_ref() == Some(own),
            None => false,
        };
        if !concerns {
            return Err(ApiError::Forbidden(format!(
                "a token of `{own}` settles without an owner only work `{own}` sent or is sent"
            )));
        }
    }
    let done = work
        .settle(&request.id, owner.as_deref(), settlement)
        .await?;
    Ok(axum::Json(DoneJson { done }))
}

/// Moves work that used up its attempts to the dead letters.
#[utoipa::path(
    post,
    path = "/medium/work/bury",
    tag = "medium",
    security(("bearer" = [])),
    request_body = BuryJson,
    responses(
        (status = 200, description = "Whether it was buried", body = DoneJson),
        (status = 400, description = "A bad id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A token without a service or admin", body = ErrorBody),
    )
)]
pub(crate) async fn bury(
    State(state): State<AppState>,
    caller: AnyCaller,
    Json(request): Json<BuryJson>,
) -> ApiResult<axum::Json<DoneJson>> {
    let acting = Acting::of(&caller)?;
    check_name("id", &request.id)?;
    let owner = acting.owner(&request.owner)?;
    let done = work(&state)?
        .bury(&request.id, &owner, &request.reason)
        .await?;
    Ok(axum::Json(DoneJson { done }))
}

/// Waits until a request is settled, at most `timeout_ms` (and at most the gateway's
/// `max_request_timeout`); the settled request, or none.
#[utoipa::path(
    post,
    path = "/medium/work/outcome",
    tag = "medium",
    security(("bearer" = [])),
    request_body = OutcomeJson,
    responses(
        (status = 200, description = "The settled request, or none in time", body = MaybeMessageJson),
        (status = 400, description = "A bad id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A token without a service or admin, or the outcome of another service's request", body = ErrorBody),
    )
)]
pub(crate) async fn outcome(
    State(state): State<AppState>,
    caller: AnyCaller,
    Json(request): Json<OutcomeJson>,
) -> ApiResult<axum::Json<MaybeMessageJson>> {
    let acting = Acting::of(&caller)?;
    check_name("id", &request.id)?;
    let timeout =
        Duration::from_millis(request.timeout_ms).min(state.options().max_request_timeout);
    let outcome = work(&state)?.await_outcome(&request.id, timeout).await?;
    if let (Some(message), Some(own)) = (&outcome, &acting.service) {
        if &message.source_service != own {
            return Err(ApiError::Forbidden(format!(
                "a token of `{own}` reads the outcomes of `{own}`'s requests only"
            )));
        }
    }
    maybe_message(outcome)
}

fn records(state: &AppState) -> ApiResult<&dyn crate::medium::Records> {
    Ok(medium(state).records_or_unsupported()?)
}

/// Reserves an idempotency record (a service token's consumers are scoped to it).
#[utoipa::path(
    post,
    path = "/medium/records/reserve",
    tag = "medium",
    security(("bearer" = [])),
    request_body = RecordJson,
    responses(
        (status = 200, description = "Reserved, done (with the result) or busy", body = ReservationJson),
        (status = 400, description = "A bad name or lease", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A token without a service or admin", body = ErrorBody),
    )
)]
pub(crate) async fn reserve(
    State(state): State<AppState>,
    caller: AnyCaller,
    Json(request): Json<RecordJson>,
) -> ApiResult<axum::Json<ReservationJson>> {
    let acting = Acting::of(&caller)?;
    let consumer = acting.scoped("consumer", &request.consumer)?;
    check_name("id", &request.id)?;
    check_name("owner", &request.owner)?;
    let lease = ms(request.lease_ms, "lease_ms", MAX_LEASE_MS)?;
    let reservation = records(&state)?
        .processed_reserve(&consumer, &request.id, &request.owner, lease)
        .await?;
    Ok(axum::Json((&reservation).into()))
}

/// Marks a reserved record done, with the handler's result.
#[utoipa::path(
    post,
    path = "/medium/records/complete",
    tag = "medium",
    security(("bearer" = [])),
    request_body = RecordJson,
    responses(
        (status = 204, description = "Done"),
        (status = 400, description = "A bad name or result", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A token without a service or admin", body = ErrorBody),
    )
)]
pub(crate) async fn complete(
    State(state): State<AppState>,
    caller: AnyCaller,
    Json(request): Json<RecordJson>,
) -> ApiResult<axum::http::StatusCode> {
    let acting = Acting::of(&caller)?;
    let consumer = acting.scoped("consumer", &request.consumer)?;
    check_name("id", &request.id)?;
    check_name("owner", &request.owner)?;
    let result = request
        .result
        .map(|r| wire::doc_of(r, "result"))
        .transpose()?;
    records(&state)?
        .processed_complete(&consumer, &request.id, &request.owner, result)
        .await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// Drops a reservation whose handler failed.
#[utoipa::path(
    post,
    path = "/medium/records/release",
    tag = "medium",
    security(("bearer" = [])),
    request_body = RecordJson,
    responses(
        (status = 204, description = "Released"),
        (status = 400, description = "A bad name", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A token without a service or admin", body = ErrorBody),
    )
)]
pub(crate) async fn release(
    State(state): State<AppState>,
    caller: AnyCaller,
    Json(request): Json<RecordJson>,
) -> ApiResult<axum::http::StatusCode> {
    let acting = Acting::of(&caller)?;
    let consumer = acting.scoped("consumer", &request.consumer)?;
    check_name("id", &request.id)?;
    check_name("owner", &request.owner)?;
    records(&state)?
        .processed_release(&consumer, &request.id, &request.owner)
        .await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

fn dead_store(state: &AppState) -> ApiResult<&dyn crate::medium::DeadLetterStore> {
    Ok(medium(state).dead_letter_store_or_unsupported()?)
}

fn dead_json(letter: &crate::medium::DeadLetter) -> DeadJson {
    DeadJson {
        id: letter.id.clone(),
        document: wire::ext_of(&letter.document),
        reason: letter.reason.clone(),
        at: letter.at.map(wire::ext_of_date),
    }
}

/// Keeps a document that reached a consumer but cannot be delivered (a service token:
/// one its service received or sent).
#[utoipa::path(
    post,
    path = "/medium/dead",
    tag = "medium",
    security(("bearer" = [])),
    request_body = DeadJson,
    responses(
        (status = 204, description = "Kept"),
        (status = 400, description = "Not a document", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "A document neither to nor from the token's service", body = ErrorBody),
    )
)]
pub(crate) async fn dead_letter(
    State(state): State<AppState>,
    caller: AnyCaller,
    Json(request): Json<DeadJson>,
) -> ApiResult<axum::http::StatusCode> {
    let acting = Acting::of(&caller)?;
    let document = wire::doc_of(request.document, "document")?;
    if let Some(own) = &acting.service {
        // An admin's retry republishes a dead letter as its sender: a service token
        // keeps only documents its own service sent or is sent (not a broadcast of
        // another service, whose sender it could name at will).
        let text = |key: &str| document.get_str(key).ok();
        let concerns = text("serviceNameSource") == Some(own.as_str())
            || text("serviceNameDest") == Some(own.as_str());
        if !concerns {
            return Err(ApiError::Forbidden(format!(
                "a token of `{own}` keeps dead letters of messages to or from `{own}` only"
            )));
        }
    }
    dead_store(&state)?
        .dead_letter(document, request.reason)
        .await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// The dead letters, oldest first, at most `limit` (1 to 10 000).
#[utoipa::path(
    post,
    path = "/medium/dead/list",
    tag = "medium",
    security(("bearer" = ["admin"])),
    request_body = LimitJson,
    responses(
        (status = 200, description = "The dead letters", body = [DeadJson]),
        (status = 400, description = "A limit outside 1..=10000", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
    )
)]
pub(crate) async fn dead_list(
    State(state): State<AppState>,
    _admin: Admin,
    Json(request): Json<LimitJson>,
) -> ApiResult<axum::Json<Vec<DeadJson>>> {
    if !(1..=10_000).contains(&request.limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and 10000, not {}",
            request.limit
        )));
    }
    let letters = dead_store(&state)?
        .dead_list(request.limit as usize)
        .await?;
    Ok(axum::Json(letters.iter().map(dead_json).collect()))
}

/// One dead letter (an empty list: none).
#[utoipa::path(
    post,
    path = "/medium/dead/get",
    tag = "medium",
    security(("bearer" = ["admin"])),
    request_body = IdJson,
    responses(
        (status = 200, description = "The dead letter, or none", body = [DeadJson]),
        (status = 400, description = "No id", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
    )
)]
pub(crate) async fn dead_get(
    State(state): State<AppState>,
    _admin: Admin,
    Json(request): Json<IdJson>,
) -> ApiResult<axum::Json<Vec<DeadJson>>> {
    let id = request
        .id
        .ok_or_else(|| ApiError::BadRequest("an id is needed".into()))?;
    let letter = dead_store(&state)?.dead_get(&id).await?;
    Ok(axum::Json(letter.iter().map(dead_json).collect()))
}

/// Removes one dead letter, or all of them without an id; how many.
#[utoipa::path(
    post,
    path = "/medium/dead/remove",
    tag = "medium",
    security(("bearer" = ["admin"])),
    request_body = IdJson,
    responses(
        (status = 200, description = "How many were removed", body = CountJson),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
    )
)]
pub(crate) async fn dead_remove(
    State(state): State<AppState>,
    _admin: Admin,
    Json(request): Json<IdJson>,
) -> ApiResult<axum::Json<CountJson>> {
    let count = dead_store(&state)?
        .dead_remove(request.id.as_deref())
        .await?;
    Ok(axum::Json(CountJson { count }))
}

fn inspection<'a>(state: &'a AppState, what: &str) -> ApiResult<&'a dyn crate::medium::Inspection> {
    Ok(medium(state).inspection_or_unsupported(what)?)
}

/// Counts over the medium: messages by service, action, type and state, the queue
/// depth, the dead letters, each named subscription's lag.
#[utoipa::path(
    post,
    path = "/medium/inspection/stats",
    tag = "medium",
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, description = "The counts", body = StatsJson),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 501, description = "The medium cannot count", body = ErrorBody),
    )
)]
pub(crate) async fn stats(
    State(state): State<AppState>,
    _admin: Admin,
) -> ApiResult<axum::Json<StatsJson>> {
    let stats = inspection(&state, "stats")?.stats().await?;
    Ok(axum::Json((&stats).into()))
}

/// The work queues and their counts.
#[utoipa::path(
    post,
    path = "/medium/inspection/queues",
    tag = "medium",
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, description = "The queues", body = [QueueJson]),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 501, description = "The medium cannot count", body = ErrorBody),
    )
)]
pub(crate) async fn queues(
    State(state): State<AppState>,
    _admin: Admin,
) -> ApiResult<axum::Json<Vec<QueueJson>>> {
    let queues = inspection(&state, "queue counts")?.queues().await?;
    Ok(axum::Json(
        queues
            .into_iter()
            .map(|q| QueueJson {
                service: q.service,
                action: q.action,
                depth: q.depth,
                in_flight: q.in_flight,
                dead: q.dead,
            })
            .collect(),
    ))
}

/// Ends the pending work of a service's action that no live worker holds; how many.
#[utoipa::path(
    post,
    path = "/medium/inspection/purge",
    tag = "medium",
    security(("bearer" = ["admin"])),
    request_body = QueueKeyJson,
    responses(
        (status = 200, description = "How many were purged", body = CountJson),
        (status = 400, description = "A bad name", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 501, description = "The medium cannot purge", body = ErrorBody),
    )
)]
pub(crate) async fn purge(
    State(state): State<AppState>,
    _admin: Admin,
    Json(request): Json<QueueKeyJson>,
) -> ApiResult<axum::Json<CountJson>> {
    check_name("service", &request.service)?;
    check_name("action", &request.action)?;
    let count = inspection(&state, "queue purges")?
        .queue_purge(&request.service, &request.action)
        .await?;
    Ok(axum::Json(CountJson { count }))
}

/// One idempotency record, as kept (consumers as the medium names them).
#[utoipa::path(
    post,
    path = "/medium/inspection/processed",
    tag = "medium",
    security(("bearer" = ["admin"])),
    request_body = RecordJson,
    responses(
        (status = 200, description = "The record, or none", body = MaybeProcessedJson),
        (status = 400, description = "A bad name", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 501, description = "The medium keeps no records to read", body = ErrorBody),
    )
)]
pub(crate) async fn processed_get(
    State(state): State<AppState>,
    _admin: Admin,
    Json(request): Json<RecordJson>,
) -> ApiResult<axum::Json<MaybeProcessedJson>> {
    check_name("consumer", &request.consumer)?;
    check_name("id", &request.id)?;
    let record = inspection(&state, "idempotency records")?
        .processed_get(&request.consumer, &request.id)
        .await?;
    Ok(axum::Json(MaybeProcessedJson {
        record: record.map(|r| ProcessedJson {
            consumer: r.consumer,
            id: r.id,
            done: r.done,
            result: r.result.as_ref().map(wire::ext_of),
            at: r.at.map(wire::ext_of_date),
        }),
    }))
}

/// Removes one idempotency record, whatever its state; how many (0 or 1).
#[utoipa::path(
    post,
    path = "/medium/inspection/processed/remove",
    tag = "medium",
    security(("bearer" = ["admin"])),
    request_body = RecordJson,
    responses(
        (status = 200, description = "How many were removed", body = CountJson),
        (status = 400, description = "A bad name", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
        (status = 501, description = "The medium keeps no records to remove", body = ErrorBody),
    )
)]
pub(crate) async fn processed_remove(
    State(state): State<AppState>,
    _admin: Admin,
    Json(request): Json<RecordJson>,
) -> ApiResult<axum::Json<CountJson>> {
    check_name("consumer", &request.consumer)?;
    check_name("id", &request.id)?;
    let count = inspection(&state, "idempotency records")?
        .processed_remove(&request.consumer, &request.id)
        .await?;
    Ok(axum::Json(CountJson { count }))
}
