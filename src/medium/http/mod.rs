//! The HTTP medium (`common.intracom.medium=http`, feature `http`): a bus whose medium
//! is a remote intracom gateway.
//!
//! Why it exists: a service that should not (or cannot) reach the database or the
//! broker itself attaches through a gateway (`intracom serve`) over HTTP, and a few
//! gateways can hold the server's change streams for many services. Each operation of
//! the gateway's own medium is one call of its `/medium/...` routes; a follower is one
//! Server-Sent Events stream whose events carry each message's position, so the
//! medium resumes it after the last message it read when the stream breaks, on the
//! same gateway or on the next one (`common.intracom.http.url` may list several, all
//! in front of the same database). A follower from now that has read nothing yet
//! resumes after its anchor instead: the stream's first event, the place after every
//! message the gateway's medium held before the follower started, which `follow`
//! waits for. A gateway whose medium cannot name it (MQTT) sends none: such a follower
//! opens again from now, and misses what was published while its stream was broken.
//!
//! The capabilities are the gateway's medium's, asked at connect: the HTTP medium adds
//! none and fakes none. Work pushed to workers (MQTT's shared subscriptions) does not
//! travel over HTTP: on a gateway whose medium has no stored queue, this medium has no
//! work queue either.
//!
//! Errors: a gateway that cannot be reached (or answers 503, 429, 408, 504) is
//! [`Error::Unavailable`], retryable, so the bus keeps publishes in its outbox until a
//! gateway answers; a refusal (4xx) is the non-retryable error that matches it.

mod sse;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bson::Document;
use futures::stream::BoxStream;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::wire::{self, *};
use super::{
    Appended, CatalogMap, ClaimRequest, DeadLetter, DeadLetterStore, Event, EventStream,
    Inspection, Medium, ProcessedRecord, QueueStats, Records, Reservation, Settlement, Stats,
    WorkQueue,
};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::filter::{Filter, Position, SharedPosition, StartFrom};
use crate::message::Message;

/// The medium's name in errors and config.
const NAME: &str = "http";

/// How long a call other than a follower's stream or a wait may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long to wait for a TCP connection to a gateway.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest wait for a request's outcome in one call (the gateway may cut it
/// shorter: its `max_request_timeout`); a longer wait is several calls.
const OUTCOME_SLICE: Duration = Duration::from_secs(60);

/// Events a follower reads ahead of its consumer.
const FOLLOW_BUFFER: usize = 256;

/// The first and the longest pause before a broken follower's stream is opened again.
const RECONNECT_FIRST: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// A bus's medium that is a remote intracom gateway. Made by
/// [`connect`](super::connect) for `common.intracom.medium=http`.
pub struct HttpMedium {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    /// The gateways' base URLs, in order.
    urls: Vec<String>,
    /// The one used now (an index into `urls`).
    current: AtomicUsize,
    token: Option<String>,
    info: MediumInfo,
    closed: crate::stop::Stop,
}

/// The body of a gateway's error answer.
#[derive(Deserialize)]
struct ErrorAnswer {
    code: String,
    message: String,
}

/// TLS for `https://` gateways: rustls with the ring provider, the system's roots or a
/// CA file (none are loaded when every URL is plain `http://`).
fn tls_config(config: &Config) -> Result<rustls::ClientConfig> {
    let https = config.http.urls.iter().any(|u| u.starts_with("https://"));
    let roots = crate::tls::roots(
        "common.intracom.http.ca_file",
        config.http.ca_file.as_deref(),
        https,
        "https://",
    )?;
    crate::tls::client_config(
        roots,
        "common.intracom.http.url",
        config.http.urls.join(","),
    )
}

/// The crate's error for a gateway's error answer.
fn error_of(status: reqwest::StatusCode, answer: Option<ErrorAnswer>) -> Error {
    let (code, message) = match answer {
        Some(a) => (a.code, a.message),
        None => (
            String::new(),
            status.canonical_reason().unwrap_or("error").to_string(),
        ),
    };
    match code.as_str() {
        "invalid_message" | "bad_request" | "bad_payload" | "too_complex" | "bad_event_id" => {
            Error::InvalidMessage { reason: message }
        }
        "unsupported" => Error::Unsupported {
            medium: NAME.into(),
            what: message,
        },
        // The gateway's errors travel as their code and text: the variants are rebuilt
        // from the text the crate writes for them (what it does not give stays empty).
        "too_large" => too_large_of(&message),
        // Filled in by the caller, which knows the consumer and the message.
        "reservation_lost" => Error::ReservationLost {
            consumer: String::new(),
            id: String::new(),
        },
        "unknown_sender" => match between(&message, "`", "`") {
            Some(service) => Error::UnknownSender {
                service: service.to_string(),
            },
            None => Error::refused(NAME, format!("the gateway answered {status}: {message}")),
        },
        "unknown_action" => {
            let service = between(&message, "service `", "`");
            let action = between(&message, "action `", "`");
            match (service, action) {
                (Some(service), Some(action)) => Error::UnknownAction {
                    service: service.to_string(),
                    action: action.to_string(),
                    declared: between(&message, "(declared: ", ")")
                        .unwrap_or_default()
                        .to_string(),
                },
                _ => Error::refused(NAME, format!("the gateway answered {status}: {message}")),
            }
        }
        _ if status.as_u16() == 413 => too_large_of(&message),
        _ if matches!(status.as_u16(), 408 | 429 | 503 | 504) => {
            Error::unavailable(NAME, format!("the gateway answered {status}: {message}"))
        }
        _ => Error::refused(NAME, format!("the gateway answered {status}: {message}")),
    }
}

/// The text of `text` between the first `open` and the next `close`.
fn between<'a>(text: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = text.find(open)? + open.len();
    let len = text[start..].find(close)?;
    Some(&text[start..start + len])
}

/// A message over the limit, from the text of `Error::TooLarge` ("message <id> is
/// <size> bytes, over the limit of <limit> bytes") or of a body over the gateway's
/// limit (no id, no size: [`HttpMedium`]'s append fills them in for a lone message).
fn too_large_of(text: &str) -> Error {
    let number = |open: &str| {
        between(text, open, " ")
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0)
    };
    Error::TooLarge {
        id: between(text, "message ", " is ")
            .unwrap_or_default()
            .to_string(),
        size: number(" is "),
        limit: number("limit of "),
    }
}

fn unreachable(url: &str, error: &reqwest::Error) -> Error {
    Error::Unavailable {
        medium: NAME,
        reason: format!("gateway {url}: {error}"),
        source: None,
    }
}

impl Inner {
    /// The most bytes a follower's stream may hold while an event is incomplete.
    fn max_buffer(&self) -> usize {
        sse::max_buffer(usize::try_from(self.info.max_message_bytes).unwrap_or(usize::MAX))
    }

    /// Sends `body` to `path`: on the gateway in use, or, when it cannot be reached, on
    /// the next ones in turn. A gateway's error answer is the crate's error.
    async fn send<B: Serialize + ?Sized>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response> {
        if self.closed.is_stopped() {
            return Err(Error::Shutdown);
        }
        let count = self.urls.len();
        let first = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for step in 0..count {
            let index = (first + step) % count;
            let url = &self.urls[index];
            let mut request = self.client.request(method.clone(), format!("{url}{path}"));
            if let Some(token) = &self.token {
                request = request.bearer_auth(token);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            if let Some(timeout) = timeout {
                request = request.timeout(timeout);
            }
            match request.send().await {
                Ok(response) => {
                    if index != first {
                        self.current.store(index, Ordering::Relaxed);
                        tracing::info!(gateway = %url, "http medium: moved to this gateway");
                    }
                    let status = response.status();
                    if status.is_success() {
                        return Ok(response);
                    }
                    let answer = response.json::<ErrorAnswer>().await.ok();
                    return Err(error_of(status, answer));
                }
                // Not sent (no connection): the next gateway may take it.
                Err(error) if error.is_connect() => {
                    tracing::debug!(gateway = %url, %error, "http medium: gateway unreachable");
                    last = Some(unreachable(url, &error));
                }
                Err(error) => return Err(unreachable(url, &error)),
            }
        }
        self.current
            .store((first + 1) % count.max(1), Ordering::Relaxed);
        Err(last.unwrap_or_else(|| Error::unavailable(NAME, "no gateway URL configured")))
    }

    /// A call whose answer is JSON.
    async fn call<B: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<R> {
        self.call_within(method, path, body, CALL_TIMEOUT).await
    }

    async fn call_within<B: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<R> {
        let response = self.send(method, path, body, Some(timeout)).await?;
        response.json::<R>().await.map_err(|e| {
            Error::unavailable(NAME, format!("reading the gateway's answer to {path}: {e}"))
        })
    }

    /// A `POST` whose answer has no body.
    async fn post_empty<B: Serialize + ?Sized>(&self, path: &str, body: &B) -> Result<()> {
        self.send(reqwest::Method::POST, path, Some(body), Some(CALL_TIMEOUT))
            .await
            .map(drop)
    }

    async fn post<B: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }
}

impl HttpMedium {
    /// Connects to the first gateway of `common.intracom.http.url` that answers (the
    /// others in turn) and asks it what its medium is. Fails with
    /// [`Error::Unavailable`] when none answers.
    pub async fn connect(config: &Config) -> Result<Self> {
        if config.http.urls.is_empty() {
            return Err(Error::config(
                "common.intracom.http.url",
                "",
                "no gateway URL",
            ));
        }
        let tls = tls_config(config)?;
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| {
                Error::config("common.intracom.http.url", config.http.urls.join(","), e)
            })?;
        let mut inner = Inner {
            client,
            urls: config.http.urls.clone(),
            current: AtomicUsize::new(0),
            token: config.http.token.clone(),
            info: MediumInfo::default(),
            closed: crate::stop::Stop::new(),
        };
        inner.info = inner
            .call::<(), MediumInfo>(reqwest::Method::GET, "/medium", None)
            .await?;
        tracing::info!(gateway = %inner.urls[inner.current.load(Ordering::Relaxed)], medium = %inner.info.medium, "http medium: connected");
        Ok(HttpMedium {
            inner: Arc::new(inner),
        })
    }

    /// The medium under the gateway (`memory`, `db`, `mqtt`), as it said at connect.
    pub fn gateway_medium(&self) -> &str {
        &self.inner.info.medium
    }
}

#[async_trait]
impl Medium for HttpMedium {
    fn name(&self) -> &'static str {
        NAME
    }

    fn max_message_bytes(&self) -> usize {
        usize::try_from(self.inner.info.max_message_bytes).unwrap_or(usize::MAX)
    }

    fn capabilities(&self) -> super::Capabilities {
        let info = &self.inner.info;
        let mut capabilities: super::Capabilities = info.capabilities.into();
        // What this medium can carry of them.
        capabilities.stored_queue &= info.work;
        capabilities.shared_state &= info.records;
        capabilities
    }

    fn work(&self) -> Option<&dyn WorkQueue> {
        self.inner.info.work.then_some(self as &dyn WorkQueue)
    }

    fn dead_letter_store(&self) -> Option<&dyn DeadLetterStore> {
        self.inner
            .info
            .dead_letters
            .then_some(self as &dyn DeadLetterStore)
    }

    fn records(&self) -> Option<&dyn Records> {
        self.inner.info.records.then_some(self as &dyn Records)
    }

    fn inspection(&self) -> Option<&dyn Inspection> {
        self.inner
            .info
            .inspection
            .then_some(self as &dyn Inspection)
    }

    async fn append(&self, messages: &[Message]) -> Result<Vec<Appended>> {
        let mut appended = Vec::with_capacity(messages.len());
        let mut sent = 0;
        for batch in batches(messages, self.max_message_bytes())? {
            let count = batch.len();
            let answer: Vec<AppendedJson> = self
                .inner
                .post("/medium/append", &AppendJson { messages: batch })
                .await
                .map_err(|error| match (error, &messages[sent..sent + count]) {
                    // A lone message over the gateway's body limit: its id and size.
                    (Error::TooLarge { id, limit, .. }, [one]) if id.is_empty() => {
                        Error::TooLarge {
                            id: one.id.clone(),
                            size: one.encoded_len().unwrap_or(0),
                            limit,
                        }
                    }
                    (error, _) => error,
                })?;
            sent += count;
            for a in answer {
                appended.push(Appended {
                    id: a.id,
                    ts: a.ts.map(wire::ts_of).transpose()?,
                    duplicate: a.duplicate,
                });
            }
        }
        Ok(appended)
    }

    async fn follow(&self, from: StartFrom, filter: Filter) -> Result<EventStream> {
        self.open_follower(FollowJson::new(&from, &filter, None))
            .await
    }

    async fn follow_durable(
        &self,
        name: &str,
        from: StartFrom,
        filter: Filter,
    ) -> Result<EventStream> {
        self.open_follower(FollowJson::new(&from, &filter, Some(name)))
            .await
    }

    async fn catalog_load(&self) -> Result<CatalogMap> {
        let map: std::collections::BTreeMap<String, Vec<String>> = self
            .inner
            .call::<(), _>(reqwest::Method::GET, "/medium/catalog", None)
            .await?;
        Ok(map
            .into_iter()
            .map(|(service, actions)| (service, actions.into_iter().collect()))
            .collect())
    }

    async fn catalog_add(&self, service: &str, actions: &[String]) -> Result<()> {
        let body = CatalogAddJson {
            service: service.to_string(),
            actions: actions.to_vec(),
        };
        self.inner.post_empty("/medium/catalog", &body).await
    }

    async fn checkpoint_load(&self, name: &str) -> Result<Option<Position>> {
        let body = CheckpointJson {
            name: name.to_string(),
            position: None,
        };
        let answer: CheckpointJson = self.inner.post("/medium/checkpoint/load", &body).await?;
        answer.position.map(wire::position_of).transpose()
    }

    async fn checkpoint_save(&self, name: &str, position: &Position) -> Result<()> {
        let body = CheckpointJson {
            name: name.to_string(),
            position: Some(wire::ext_of_position(position)),
        };
        self.inner
            .post_empty("/medium/checkpoint/save", &body)
            .await
    }

    async fn close(&self) {
        self.inner.closed.stop();
    }
}

impl HttpMedium {
    /// Opens a follower's stream (so its start is anchored when this returns), then
    /// reads it in a task that opens it again after the last position read whenever it
    /// breaks, until the medium is closed or the stream's reader goes away.
    async fn open_follower(&self, request: FollowJson) -> Result<EventStream> {
        let inner = Arc::clone(&self.inner);
        let response = inner
            .send(
                reqwest::Method::POST,
                "/medium/follow",
                Some(&request),
                None,
            )
            .await?;
        let mut request = request;
        let mut events = sse::events(response.bytes_stream(), inner.max_buffer(), sse::IDLE);
        let mut pending = None;
        if matches!(request.from, FromJson::Now) && inner.info.anchors {
            // The gateway's anchor comes first: this follower is anchored once it is
            // here, and resumes from it if the stream breaks before a message.
            match tokio::time::timeout(CALL_TIMEOUT, events.next()).await {
                Ok(Some(Ok(event))) if event.kind == "anchor" => anchor(&event, &mut request),
                Ok(Some(Ok(event))) => pending = Some(event),
                Ok(Some(Err(error))) => {
                    return Err(Error::unavailable(
                        NAME,
                        format!("a follower's stream broke before its anchor: {error}"),
                    ))
                }
                Ok(None) | Err(_) => {
                    return Err(Error::unavailable(
                        NAME,
                        "a follower's stream ended before its anchor",
                    ))
                }
            }
        }
        let (sender, receiver) = mpsc::channel(FOLLOW_BUFFER);
        tokio::spawn(follow(inner, request, events, pending, sender));
        Ok(Box::pin(futures::stream::unfold(
            receiver,
            |mut receiver| async move { receiver.recv().await.map(|item| (item, receiver)) },
        )))
    }
}

/// A follower from now that has read nothing yet resumes after the gateway's anchor
/// (when the gateway's medium names one: otherwise it opens again from now).
fn anchor(event: &sse::Event, request: &mut FollowJson) {
    if !matches!(request.from, FromJson::Now) {
        return;
    }
    match serde_json::from_str::<AnchorJson>(&event.data) {
        Ok(AnchorJson {
            position: Some(position),
        }) => {
            request.from = FromJson::After;
            request.position = Some(position);
        }
        Ok(AnchorJson { position: None }) => {}
        Err(error) => tracing::warn!(%error, "http medium: a follower's anchor is unreadable"),
    }
}

/// What a follower's task does with one SSE event; `false`: stop (the reader went away).
async fn forward(
    event: sse::Event,
    request: &mut FollowJson,
    sender: &mpsc::Sender<Result<Event>>,
) -> bool {
    let item = match event.kind.as_str() {
        "message" => match serde_json::from_str::<FollowedJson>(&event.data)
            .map_err(|e| Error::unavailable(NAME, format!("a follower's event: {e}")))
            .and_then(|f| {
                let position = wire::position_of(f.position.clone())?;
                let message = wire::message_of(f.message)?;
                Ok((message, position, f.position))
            }) {
            Ok((message, position, ext)) => {
                request.from = FromJson::After;
                request.position = Some(ext);
                Ok(Event::Message(
                    Arc::new(message),
                    SharedPosition::new(position),
                ))
            }
            Err(error) => Err(error),
        },
        "anchor" => {
            anchor(&event, request);
            return true;
        }
        "lost" => match serde_json::from_str::<LostJson>(&event.data) {
            Ok(lost) => Ok(Event::Lost { count: lost.count }),
            Err(e) => Err(Error::unavailable(NAME, format!("a follower's event: {e}"))),
        },
        "error" => match serde_json::from_str::<ErrorAnswer>(&event.data) {
            Ok(answer) if answer.code == "unavailable" => {
                Err(Error::unavailable(NAME, answer.message))
            }
            Ok(answer) => Err(Error::refused(NAME, answer.message)),
            Err(e) => Err(Error::unavailable(NAME, format!("a follower's event: {e}"))),
        },
        _ => return true,
    };
    sender.send(item).await.is_ok()
}

/// A follower's task (see [`HttpMedium::open_follower`]).
async fn follow(
    inner: Arc<Inner>,
    mut request: FollowJson,
    first: BoxStream<'static, std::result::Result<sse::Event, String>>,
    pending: Option<sse::Event>,
    sender: mpsc::Sender<Result<Event>>,
) {
    let stop = inner.closed.token().clone();
    if let Some(event) = pending {
        if !forward(event, &mut request, &sender).await {
            return;
        }
    }
    let mut open = Some(first);
    let mut pause = RECONNECT_FIRST;
    loop {
        if let Some(mut events) = open.take() {
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = sender.closed() => return,
                    next = events.next() => next,
                };
                match next {
                    Some(Ok(event)) => {
                        pause = RECONNECT_FIRST;
                        if !forward(event, &mut request, &sender).await {
                            return;
                        }
                    }
                    Some(Err(error)) => {
                        tracing::debug!(%error, "http medium: a follower's stream broke; opening it again");
                        break;
                    }
                    None => {
                        tracing::debug!("http medium: a follower's stream ended; opening it again");
                        break;
                    }
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = sender.closed() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(RECONNECT_MAX);
        match inner
            .send(
                reqwest::Method::POST,
                "/medium/follow",
                Some(&request),
                None,
            )
            .await
        {
            Ok(response) => {
                tracing::info!("http medium: a follower resumed");
                open = Some(sse::events(
                    response.bytes_stream(),
                    inner.max_buffer(),
                    sse::IDLE,
                ));
            }
            Err(error) if error.is_retryable() => {
                tracing::debug!(%error, "http medium: a follower waits for a gateway");
            }
            Err(Error::Shutdown) => return,
            Err(error) => {
                let _ = sender.send(Err(error)).await;
                return;
            }
        }
    }
}

/// `messages` as extended JSON, in batches whose JSON stays within `limit` bytes (the
/// gateway's request body limit is its message size limit by default): one message
/// alone when it is larger.
fn batches(messages: &[Message], limit: usize) -> Result<Vec<Vec<serde_json::Value>>> {
    let mut batches: Vec<Vec<serde_json::Value>> = Vec::new();
    let mut size = 0;
    for message in messages {
        let value = wire::ext_of_message(message)?;
        // The encoding of a value made from a document cannot fail; its length is an
        // estimate only if it did.
        let bytes = serde_json::to_string(&value).map_or(0, |t| t.len()) + 1;
        match batches.last_mut() {
            Some(batch) if size + bytes <= limit.saturating_sub(64) => batch.push(value),
            _ => {
                batches.push(vec![value]);
                size = 0;
            }
        }
        size += bytes;
    }
    Ok(batches)
}

fn ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn message_from(answer: MaybeMessageJson) -> Result<Option<Message>> {
    answer.message.map(wire::message_of).transpose()
}

#[async_trait]
impl WorkQueue for HttpMedium {
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Message>> {
        let body = ClaimJson {
            service: request.service.clone(),
            actions: request.actions.clone(),
            owner: request.owner.clone(),
            lease_ms: ms(request.lease),
        };
        message_from(self.inner.post("/medium/work/claim", &body).await?)
    }

    async fn renew(&self, id: &str, owner: &str, lease: Duration) -> Result<bool> {
        let body = RenewJson {
            id: id.to_string(),
            owner: owner.to_string(),
            lease_ms: ms(lease),
        };
        let answer: DoneJson = self.inner.post("/medium/work/renew", &body).await?;
        Ok(answer.done)
    }

    async fn settle(&self, id: &str, owner: Option<&str>, settlement: Settlement) -> Result<bool> {
        let body = SettleJson {
            id: id.to_string(),
            owner: owner.map(str::to_string),
            settlement: (&settlement).into(),
        };
        let answer: DoneJson = self.inner.post("/medium/work/settle", &body).await?;
        Ok(answer.done)
    }

    async fn bury(&self, id: &str, owner: &str, reason: &str) -> Result<bool> {
        let body = BuryJson {
            id: id.to_string(),
            owner: owner.to_string(),
            reason: reason.to_string(),
        };
        let answer: DoneJson = self.inner.post("/medium/work/bury", &body).await?;
        Ok(answer.done)
    }

    async fn await_outcome(&self, id: &str, timeout: Duration) -> Result<Option<Message>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let slice = left.min(OUTCOME_SLICE);
            let body = OutcomeJson {
                id: id.to_string(),
                timeout_ms: ms(slice),
            };
            let answer: MaybeMessageJson = self
                .inner
                .call_within(
                    reqwest::Method::POST,
                    "/medium/work/outcome",
                    Some(&body),
                    slice + CALL_TIMEOUT,
                )
                .await?;
            if let Some(message) = message_from(answer)? {
                return Ok(Some(message));
            }
            // The gateway may wait less than asked (its `max_request_timeout`).
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }
}

#[async_trait]
impl DeadLetterStore for HttpMedium {
    async fn dead_letter(&self, document: Document, reason: String) -> Result<()> {
        let body = DeadJson {
            id: super::id_of(&document),
            document: wire::ext_of(&document),
            reason,
            at: None,
        };
        self.inner.post_empty("/medium/dead", &body).await
    }

    async fn dead_list(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let body = LimitJson {
            limit: limit.clamp(1, 10_000) as u64,
        };
        let answer: Vec<DeadJson> = self.inner.post("/medium/dead/list", &body).await?;
        answer.into_iter().map(dead_from).collect()
    }

    async fn dead_get(&self, id: &str) -> Result<Option<DeadLetter>> {
        let body = IdJson {
            id: Some(id.to_string()),
        };
        let answer: Vec<DeadJson> = self.inner.post("/medium/dead/get", &body).await?;
        answer.into_iter().next().map(dead_from).transpose()
    }

    async fn dead_remove(&self, id: Option<&str>) -> Result<u64> {
        let body = IdJson {
            id: id.map(str::to_string),
        };
        let answer: CountJson = self.inner.post("/medium/dead/remove", &body).await?;
        Ok(answer.count)
    }
}

fn dead_from(letter: DeadJson) -> Result<DeadLetter> {
    Ok(DeadLetter {
        id: letter.id,
        document: wire::doc_of(letter.document, "dead letter")?,
        reason: letter.reason,
        at: letter.at.and_then(wire::date_of),
    })
}

#[async_trait]
impl Records for HttpMedium {
    async fn processed_reserve(
        &self,
        consumer: &str,
        id: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<Reservation> {
        let body = RecordJson {
            consumer: consumer.to_string(),
            id: id.to_string(),
            owner: owner.to_string(),
            lease_ms: ms(lease),
            result: None,
        };
        let answer: ReservationJson = self.inner.post("/medium/records/reserve", &body).await?;
        answer.into_reservation()
    }

    async fn processed_complete(
        &self,
        consumer: &str,
        id: &str,
        owner: &str,
        result: Option<Document>,
    ) -> Result<()> {
        let body = RecordJson {
            consumer: consumer.to_string(),
            id: id.to_string(),
            owner: owner.to_string(),
            lease_ms: 0,
            result: result.as_ref().map(wire::ext_of),
        };
        match self
            .inner
            .post_empty("/medium/records/complete", &body)
            .await
        {
            Err(Error::ReservationLost { .. }) => Err(Error::ReservationLost {
                consumer: consumer.to_string(),
                id: id.to_string(),
            }),
            other => other,
        }
    }

    async fn processed_release(&self, consumer: &str, id: &str, owner: &str) -> Result<()> {
        let body = RecordJson {
            consumer: consumer.to_string(),
            id: id.to_string(),
            owner: owner.to_string(),
            lease_ms: 0,
            result: None,
        };
        self.inner
            .post_empty("/medium/records/release", &body)
            .await
    }
}

#[async_trait]
impl Inspection for HttpMedium {
    async fn stats(&self) -> Result<Stats> {
        let answer: StatsJson = self
            .inner
            .call::<(), _>(reqwest::Method::POST, "/medium/inspection/stats", None)
            .await?;
        Ok(answer.into())
    }

    async fn queues(&self) -> Result<Vec<QueueStats>> {
        let answer: Vec<QueueJson> = self
            .inner
            .call::<(), _>(reqwest::Method::POST, "/medium/inspection/queues", None)
            .await?;
        Ok(answer
            .into_iter()
            .map(|q| {
                let mut stats = QueueStats::new(q.service, q.action);
                stats.depth = q.depth;
                stats.in_flight = q.in_flight;
                stats.dead = q.dead;
                stats
            })
            .collect())
    }

    async fn queue_purge(&self, service: &str, action: &str) -> Result<u64> {
        let body = QueueKeyJson {
            service: service.to_string(),
            action: action.to_string(),
        };
        let answer: CountJson = self.inner.post("/medium/inspection/purge", &body).await?;
        Ok(answer.count)
    }

    async fn processed_get(&self, consumer: &str, id: &str) -> Result<Option<ProcessedRecord>> {
        let body = RecordJson {
            consumer: consumer.to_string(),
            id: id.to_string(),
            owner: String::new(),
            lease_ms: 0,
            result: None,
        };
        let answer: MaybeProcessedJson = self
            .inner
            .post("/medium/inspection/processed", &body)
            .await?;
        answer
            .record
            .map(|r| {
                Ok(ProcessedRecord {
                    consumer: r.consumer,
                    id: r.id,
                    done: r.done,
                    result: r.result.map(|d| wire::doc_of(d, "result")).transpose()?,
                    at: r.at.and_then(wire::date_of),
                })
            })
            .transpose()
    }

    async fn processed_remove(&self, consumer: &str, id: &str) -> Result<u64> {
        let body = RecordJson {
            consumer: consumer.to_string(),
            id: id.to_string(),
            owner: String::new(),
            lease_ms: 0,
            result: None,
        };
        let answer: CountJson = self
            .inner
            .post("/medium/inspection/processed/remove", &body)
            .await?;
        Ok(answer.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gateway's refusals are the matching non-retryable errors; its being away or
    /// busy is retryable.
    #[test]
    fn appends_are_cut_to_the_body_limit() {
        let messages: Vec<Message> = (0..10)
            .map(|i| {
                Message::broadcast("reload").body(bson::doc! { "pad": "x".repeat(1000), "i": i })
            })
            .collect();
        let one = serde_json::to_string(&wire::ext_of_message(&messages[0]).expect("ext"))
            .expect("json")
            .len();
        let cut = batches(&messages, 3 * one + 100).expect("batches");
        assert_eq!(cut.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 3, 1]);
        let whole = batches(&messages, usize::MAX).expect("batches");
        assert_eq!(whole.len(), 1);
        let alone = batches(&messages[..2], 10).expect("batches");
        assert_eq!(alone.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1]);
    }

    /// A follower from now takes the gateway's anchor as where it resumes; a null
    /// anchor leaves it from now, and a follower that has a position keeps it.
    #[test]
    fn a_follower_from_now_resumes_after_its_anchor() {
        let event = |data: &str| sse::Event {
            kind: "anchor".into(),
            data: data.into(),
        };
        let anchored = r#"{"position":{"ts":{"$timestamp":{"t":3,"i":1}},"token":{"seq":{"$numberLong":"7"}}}}"#;
        let mut request = FollowJson::new(&StartFrom::Now, &Filter::monitor(), None);
        anchor(&event(r#"{"position":null}"#), &mut request);
        assert!(matches!(request.from, FromJson::Now));
        assert!(request.position.is_none());
        anchor(&event(anchored), &mut request);
        assert!(matches!(request.from, FromJson::After));
        let anchored_at = |request: &FollowJson| {
            wire::position_of(request.position.clone().expect("a position"))
                .expect("the anchor's position")
                .ts
        };
        let first = bson::Timestamp {
            time: 3,
            increment: 1,
        };
        assert_eq!(anchored_at(&request), first);
        // A later anchor (a stream opened again) does not move a follower that has one.
        let other = r#"{"position":{"ts":{"$timestamp":{"t":9,"i":1}}}}"#;
        anchor(&event(other), &mut request);
        assert_eq!(anchored_at(&request), first);
    }

    #[test]
    fn answers_map_to_the_crate_s_errors() {
        let answer = |code: &str| {
            Some(ErrorAnswer {
                code: code.into(),
                message: "why".into(),
            })
        };
        use reqwest::StatusCode as S;
        assert!(matches!(
            error_of(S::BAD_REQUEST, answer("invalid_message")),
            Error::InvalidMessage { .. }
        ));
        assert!(matches!(
            error_of(S::NOT_IMPLEMENTED, answer("unsupported")),
            Error::Unsupported { .. }
        ));
        assert!(!error_of(S::FORBIDDEN, answer("forbidden")).is_retryable());
        assert!(!error_of(S::UNAUTHORIZED, answer("unauthorized")).is_retryable());
        assert!(error_of(S::SERVICE_UNAVAILABLE, answer("shutting_down")).is_retryable());
        assert!(error_of(S::TOO_MANY_REQUESTS, answer("too_many_requests")).is_retryable());
        assert!(error_of(S::SERVICE_UNAVAILABLE, None).is_retryable());
    }

    /// The gateway's text of an error is enough to rebuild the crate's variant: what
    /// the caller matches on (the outbox keeps no message over the limit).
    #[test]
    fn refusals_of_messages_are_rebuilt() {
        use reqwest::StatusCode as S;
        let answer = |code: &str, error: Error| {
            Some(ErrorAnswer {
                code: code.into(),
                message: error.to_string(),
            })
        };
        let too_large = Error::TooLarge {
            id: "m1".into(),
            size: 70_000,
            limit: 65_536,
        };
        let got = error_of(S::PAYLOAD_TOO_LARGE, answer("too_large", too_large));
        assert!(
            matches!(&got, Error::TooLarge { id, size: 70_000, limit: 65_536 } if id == "m1"),
            "{got:?}"
        );
        let body = Some(ErrorAnswer {
            code: "too_large".into(),
            message: "the request body is over the limit of 1000 bytes (common.intracom.max_message_bytes)".into(),
        });
        let got = error_of(S::PAYLOAD_TOO_LARGE, body);
        assert!(
            matches!(got, Error::TooLarge { limit: 1000, .. }),
            "{got:?}"
        );
        let unknown = Error::UnknownAction {
            service: "billing".into(),
            action: "x".into(),
            declared: "a, b".into(),
        };
        let got = error_of(S::FORBIDDEN, answer("unknown_action", unknown));
        assert!(
            matches!(&got, Error::UnknownAction { service, action, declared }
                if service == "billing" && action == "x" && declared == "a, b"),
            "{got:?}"
        );
        let sender = Error::UnknownSender {
            service: "web".into(),
        };
        let got = error_of(S::FORBIDDEN, answer("unknown_sender", sender));
        assert!(
            matches!(&got, Error::UnknownSender { service } if service == "web"),
            "{got:?}"
        );
    }
}
