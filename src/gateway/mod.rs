//! The HTTP gateway (`intracom serve`, feature `gateway`): the bus for every language
//! and every operator.
//!
//! Why it exists: without it only Rust code that links this crate can use the bus, and
//! an operator has only the CLI. The gateway serves the bus over HTTP on top of
//! any medium: publish, subscribe as Server-Sent Events (resumable with
//! `Last-Event-ID`), ack, request/reply, retry of dead letters, queues, the
//! MessageStore and IdempotencyStore, Prometheus metrics and health probes, an OpenAPI
//! document generated from the handlers' types (`/openapi.json`), and a web console
//! (`/`) embedded in the binary.
//!
//! It is [axum](https://docs.rs/axum) (tokio's own HTTP framework, the one the tokio
//! stack we already run on maintains) served by `axum-server` for TLS with rustls.
//! Every route takes a bearer token bound to a service identity ([`Tokens`]); every
//! error is a JSON [`ErrorBody`]; request bodies over `common.intracom.max_message_bytes`
//! are refused with 413 before they are read.
//!
//! ```no_run
//! # async fn run() -> intracom::Result<()> {
//! use intracom::gateway::{Gateway, Identity, Tokens};
//! use intracom::{Config, Intracom};
//!
//! let bus = Intracom::connect(Config::from_env()?).await?;
//! let tokens = Tokens::from_file("/etc/intracom/tokens")?
//!     .with_token("dev-only", Identity::service("billing"));
//! let listener = std::net::TcpListener::bind("127.0.0.1:8080")
//!     .map_err(|e| intracom::Error::io("listening on 127.0.0.1:8080", e))?;
//! Gateway::new(bus, tokens)
//!     .serve(listener, None, async { let _ = tokio::signal::ctrl_c().await; })
//!     .await
//! # }
//! ```
//!
//! One file per concept: [`auth`](Tokens) (tokens and identities), `extract` (JSON
//! bodies, parameters, limits), `error`, `model` (the JSON shapes), `publish`
//! (publish, request), `sse` (subscribe, ack), `queues`, `dead`, `stores` (outbox and idempotency records),
//! `stats`, `ops` (probes, metrics, catalog), `openapi`, `console` (the web console's
//! assets), `server` (listening, TLS, shutdown).

mod auth;
mod connections;
mod console;
mod dead;
mod error;
mod event_id;
mod extract;
mod limits;
mod medium;
mod model;
mod openapi;
mod ops;
mod outgoing;
mod publish;
mod queues;
mod server;
mod sse;
mod stats;
mod stores;

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::bus::Intracom;

pub use auth::{Identity, Tokens};
pub use error::{ApiError, ErrorBody};
pub use event_id::{BadEventId, EventKeys, MAX_EVENT_ID_LEN, MIN_KEY_LEN};
pub use model::{MessageJson, Receipt, ReceiptStatus, Stamp};
pub use publish::{idempotent_id, PublishRequest, IDEMPOTENCY_KEY};
pub use server::Tls;
pub use sse::StreamNotice;

/// Options of the gateway. Every default is written on its field.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct GatewayOptions {
    /// Largest request body, in bytes; larger ones get 413 before they are read
    /// (default: the bus's `common.intracom.max_message_bytes`).
    pub max_body_bytes: Option<usize>,
    /// Events read ahead for one SSE client (default 256).
    pub sse_buffer: usize,
    /// Bytes of events read ahead for one SSE client (default 8 MiB): with
    /// `sse_buffer`, the most a slow client costs, beside its socket buffers. An event
    /// larger than this goes alone.
    pub sse_buffer_bytes: usize,
    /// How long a client may leave that buffer full before it falls behind: what is
    /// buffered for it is dropped, it is told (`event: lagged`) and its stream ends
    /// (default 30 s). It resumes with `Last-Event-ID`.
    pub sse_stall: Duration,
    /// How often an idle SSE stream sends a comment to keep proxies from closing it
    /// (default 15 s).
    pub keep_alive: Duration,
    /// Deliveries of one named subscription waiting for their ack, or behind an unacked
    /// one (its checkpoint passes only a run of acked deliveries), before its stream
    /// pauses (default 1000).
    pub max_in_flight: usize,
    /// The longest time-out a `POST /request` may ask for (default 5 min).
    pub max_request_timeout: Duration,
    /// SSE streams open at once, all tokens together (default 1000); another one is
    /// refused with 503 `busy`.
    pub max_sse_clients: usize,
    /// Of `max_sse_clients`, the streams kept for admin tokens (default 10): service
    /// tokens get 503 `busy` once `max_sse_clients - sse_admin_reserve` are open, so an
    /// operator can still watch.
    pub sse_admin_reserve: usize,
    /// SSE streams one token may hold open at once (default 100); one more gets 429.
    pub max_sse_per_token: usize,
    /// Bytes of events queued for all SSE clients together (default 256 MiB). When they
    /// are reached, a stream that waits for room while holding more than its share
    /// (this budget over the streams open) is told `lagged` and closed.
    pub sse_budget_bytes: usize,
    /// Requests one token may have in progress at once, SSE streams aside (default
    /// 256); one more gets 429 `too_many_requests`. Bounds what one client holds with
    /// long `POST /request` calls.
    pub max_requests_per_token: usize,
    /// The keys that sign SSE event ids (default: a random key made at start-up, so ids
    /// do not survive a restart nor pass to another gateway; give every gateway of a bus
    /// the same keys with `--event-key-file`).
    pub event_keys: Option<EventKeys>,
    /// Time to read a request's headers, and a new connection's first request (default
    /// 10 s); the connection is closed after it.
    pub header_read_timeout: Duration,
    /// Time to read a request's body once its headers are in (default 30 s); 408 after.
    pub body_read_timeout: Duration,
    /// How long a connection may stay idle, with no request in progress, before it is
    /// closed (default 60 s).
    pub idle_timeout: Duration,
    /// Connections open at once (default 1024). A new one over the cap closes the
    /// connection idle the longest; when none is idle it is closed at once. Keep it
    /// under the process's open-files limit.
    pub max_connections: usize,
    /// Streams one HTTP/2 connection may have open at once (default 64).
    pub max_h2_streams: u32,
    /// JSON values a request body may hold, all levels together (default 262144):
    /// counted before the body is parsed, so parsing cannot amplify a small body into a
    /// large amount of memory. Over it: 413 `too_complex`.
    pub max_json_values: usize,
    /// How deep a request body's JSON may nest (default 64); deeper: 413 `too_complex`.
    pub max_json_depth: usize,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            max_body_bytes: None,
            sse_buffer: 256,
            sse_buffer_bytes: 8 * 1024 * 1024,
            sse_stall: Duration::from_secs(30),
            keep_alive: Duration::from_secs(15),
            max_in_flight: 1000,
            max_request_timeout: Duration::from_secs(300),
            max_sse_clients: 1000,
            sse_admin_reserve: 10,
            max_sse_per_token: 100,
            sse_budget_bytes: 256 * 1024 * 1024,
            max_requests_per_token: 256,
            event_keys: None,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            max_h2_streams: 64,
            max_json_values: 262_144,
            max_json_depth: 64,
        }
    }
}

impl GatewayOptions {
    /// Sets the request body limit.
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = Some(bytes);
        self
    }

    /// Sets the read-ahead of one SSE client.
    pub fn sse_buffer(mut self, events: usize) -> Self {
        self.sse_buffer = events.max(1);
        self
    }

    /// Sets the bytes read ahead for one SSE client.
    pub fn sse_buffer_bytes(mut self, bytes: usize) -> Self {
        self.sse_buffer_bytes = bytes.max(1);
        self
    }

    /// Sets how long a full SSE buffer is tolerated.
    pub fn sse_stall(mut self, stall: Duration) -> Self {
        self.sse_stall = stall;
        self
    }

    /// Sets the SSE keep-alive period.
    pub fn keep_alive(mut self, every: Duration) -> Self {
        self.keep_alive = every;
        self
    }

    /// Sets how many deliveries of a named subscription may wait for an ack, or behind
    /// an unacked one, before its stream pauses.
    pub fn max_in_flight(mut self, deliveries: usize) -> Self {
        self.max_in_flight = deliveries.max(1);
        self
    }

    /// Sets how many SSE streams may be open at once.
    pub fn max_sse_clients(mut self, streams: usize) -> Self {
        self.max_sse_clients = streams.max(1);
        self
    }

    /// Sets how many SSE streams are kept for admin tokens.
    pub fn sse_admin_reserve(mut self, streams: usize) -> Self {
        self.sse_admin_reserve = streams;
        self
    }

    /// Sets how many SSE streams one token may hold.
    pub fn max_sse_per_token(mut self, streams: usize) -> Self {
        self.max_sse_per_token = streams.max(1);
        self
    }

    /// Sets the bytes queued for all SSE clients together.
    pub fn sse_budget_bytes(mut self, bytes: usize) -> Self {
        self.sse_budget_bytes = bytes.max(1);
        self
    }

    /// Sets how many requests one token may have in progress.
    pub fn max_requests_per_token(mut self, requests: usize) -> Self {
        self.max_requests_per_token = requests.max(1);
        self
    }

    /// Sets the keys that sign event ids.
    pub fn event_keys(mut self, keys: EventKeys) -> Self {
        self.event_keys = Some(keys);
        self
    }

    /// Sets the time to read a request's headers.
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// Sets the time to read a request's body.
    pub fn body_read_timeout(mut self, timeout: Duration) -> Self {
        self.body_read_timeout = timeout;
        self
    }

    /// Sets how long a connection may stay idle.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets how many connections may be open at once.
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections.max(1);
        self
    }

    /// Sets how many streams one HTTP/2 connection may open.
    pub fn max_h2_streams(mut self, streams: u32) -> Self {
        self.max_h2_streams = streams.max(1);
        self
    }

    /// Sets how many JSON values a request body may hold.
    pub fn max_json_values(mut self, values: usize) -> Self {
        self.max_json_values = values.max(1);
        self
    }

    /// Sets how deep a request body's JSON may nest.
    pub fn max_json_depth(mut self, depth: usize) -> Self {
        self.max_json_depth = depth.max(1);
        self
    }

    /// Sets the longest request time-out a client may ask for.
    pub fn max_request_timeout(mut self, timeout: Duration) -> Self {
        self.max_request_timeout = timeout;
        self
    }
}

/// The gateway: a bus, the tokens it accepts, and its options.
pub struct Gateway {
    bus: Intracom,
    tokens: Tokens,
    options: GatewayOptions,
    prometheus: Option<PrometheusHandle>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("bus", &self.bus)
            .field("tokens", &self.tokens)
            .field("options", &self.options)
            .finish()
    }
}

/// This process's Prometheus recorder: installed by the first gateway that asks, shared
/// by the others; `None` when another recorder was installed first.
fn global_prometheus() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| match crate::metrics::prometheus_builder().install_recorder() {
            Ok(handle) => Some(handle),
            Err(error) => {
                tracing::warn!(%error, "gateway: /metrics unavailable: a metrics recorder is installed already");
                None
            }
        })
        .clone()
}

impl Gateway {
    /// A gateway over `bus` that accepts `tokens`, with default options. Its own sends
    /// (dead letters sent again) go out as `bus`'s service.
    pub fn new(bus: Intracom, tokens: Tokens) -> Self {
        Gateway {
            bus,
            tokens,
            options: GatewayOptions::default(),
            prometheus: None,
        }
    }

    /// Replaces the options.
    pub fn options(mut self, options: GatewayOptions) -> Self {
        self.options = options;
        self
    }

    /// Serves `/metrics` from this recorder instead of the process-wide one the gateway
    /// installs by default.
    pub fn prometheus(mut self, handle: PrometheusHandle) -> Self {
        self.prometheus = Some(handle);
        self
    }

    fn state(self) -> AppState {
        let prometheus = self.prometheus.or_else(global_prometheus);
        let event_keys = match self.options.event_keys.clone() {
            Some(keys) => keys,
            None => {
                tracing::warn!("gateway: no event key given (GatewayOptions::event_keys): SSE event ids are signed with a key made at start-up; clients cannot resume with them after a restart nor on another gateway");
                EventKeys::ephemeral()
            }
        };
        let state = AppState(Arc::new(Inner {
            event_keys,
            tokens_in_use: limits::TokensInUse::default(),
            connections: connections::Tracker::new(
                self.options.max_connections,
                self.options.idle_timeout,
            ),
            bus: self.bus,
            tokens: self.tokens,
            options: self.options,
            inflight: sse::Inflight::default(),
            latency: stats::Latency::default(),
            series: stats::Series::default(),
            prometheus,
            sse_clients: AtomicUsize::new(0),
            sse_buffered_bytes: AtomicU64::new(0),
            sse_pressure: tokio::sync::Notify::new(),
            stop: CancellationToken::new(),
        }));
        stats::spawn_sampler(&state);
        state
    }

    /// Installs the process-wide Prometheus recorder whose metrics the gateway serves at
    /// `/metrics` (the gateway installs it when it starts otherwise); false when another
    /// recorder was installed first. Call it before connecting the gateway's bus: a bus
    /// takes its publish counters when it connects, and those taken before any recorder
    /// is installed report to none.
    pub fn install_metrics() -> bool {
        global_prometheus().is_some()
    }

    /// The gateway as an axum router, to serve with anything that serves axum (or to
    /// nest in an application's own router).
    pub fn router(self) -> Router {
        app(self.state())
    }

    /// Serves on `listener` (plain HTTP, or HTTPS with `tls`) until `shutdown` completes;
    /// then every SSE stream ends and open connections get up to 10 s to finish.
    /// Fails at once with [`Error::Config`](crate::Error::Config) when the bus's instance
    /// leaves no room for the instances the gateway derives from it (255 bytes or more).
    pub async fn serve(
        self,
        listener: std::net::TcpListener,
        tls: Option<Tls>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> crate::Result<()> {
        // The gateway acts for each token's service with an instance derived from its
        // own (`<service>-<instance>`, see `Intracom::as_service`): one that leaves no
        // room for it would fail every such request; refused here, at start.
        if self.bus.derived_room() == 0 {
            let instance = self.bus.instance();
            return Err(crate::Error::Config {
                key: "common.intracom.instance".into(),
                value: instance.into(),
                reason: format!(
                    "the gateway derives its services' instances as `<service>-<instance>`: \
                     an instance of {} bytes leaves no room under {} ({} at most)",
                    instance.len(),
                    crate::message::MAX_NAME_LEN,
                    crate::message::MAX_NAME_LEN - 2
                ),
            });
        }
        let options = &self.options;
        let limits = server::Limits {
            header_read_timeout: options.header_read_timeout,
            max_h2_streams: options.max_h2_streams,
        };
        let state = self.state();
        let stop = state.0.stop.clone();
        let tracker = Arc::clone(state.connections());
        let mut router = app(state);
        if tls.is_some() {
            router = router.layer(axum::middleware::from_fn(ops::strict_transport_security));
        }
        server::serve(router, stop, tracker, listener, tls, limits, shutdown).await
    }
}

/// Reads a file of the gateway's (tokens, event keys) with `parse`; a bad line's error
/// names the file.
fn read_file<T>(
    path: &std::path::Path,
    parse: impl FnOnce(&str) -> crate::Result<T>,
) -> crate::Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| crate::Error::ConfigFile {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text).map_err(|e| match e {
        crate::Error::Config { key, value, reason } => crate::Error::Config {
            key: format!("{} {key}", path.display()),
            value,
            reason,
        },
        other => other,
    })
}

/// Everything the routes share.
#[derive(Clone)]
pub(crate) struct AppState(Arc<Inner>);

struct Inner {
    bus: Intracom,
    tokens: Tokens,
    options: GatewayOptions,
    inflight: sse::Inflight,
    latency: stats::Latency,
    /// The console's series, and the counts it samples.
    series: stats::Series,
    prometheus: Option<PrometheusHandle>,
    sse_clients: AtomicUsize,
    /// Bytes of events queued for SSE clients now, all streams together.
    sse_buffered_bytes: AtomicU64,
    /// Woken when a stream finds the SSE budget spent: the streams waiting for room
    /// check their share.
    sse_pressure: tokio::sync::Notify,
    /// Cancelled when the gateway stops: every SSE stream ends.
    stop: CancellationToken,
    /// The keys of SSE event ids.
    event_keys: EventKeys,
    /// What each token holds now: requests in progress, SSE streams.
    tokens_in_use: limits::TokensInUse,
    /// The connections open now.
    connections: Arc<connections::Tracker>,
}

impl AppState {
    pub(crate) fn bus(&self) -> &Intracom {
        &self.0.bus
    }

    /// A handle on the bus acting as `service` (the token's), instance
    /// `<service>-<gateway instance>`.
    pub(crate) fn bus_as(&self, service: &str) -> error::ApiResult<Intracom> {
        Ok(self.0.bus.as_service(service, None)?)
    }

    pub(crate) fn tokens(&self) -> &Tokens {
        &self.0.tokens
    }

    pub(crate) fn options(&self) -> &GatewayOptions {
        &self.0.options
    }

    pub(crate) fn inflight(&self) -> &sse::Inflight {
        &self.0.inflight
    }

    pub(crate) fn latency(&self) -> &stats::Latency {
        &self.0.latency
    }

    pub(crate) fn series(&self) -> &stats::Series {
        &self.0.series
    }

    pub(crate) fn prometheus(&self) -> Option<&PrometheusHandle> {
        self.0.prometheus.as_ref()
    }

    pub(crate) fn sse_clients(&self) -> &AtomicUsize {
        &self.0.sse_clients
    }

    /// Bytes of events queued for SSE clients now, all streams together.
    pub(crate) fn sse_buffered_bytes(&self) -> &AtomicU64 {
        &self.0.sse_buffered_bytes
    }

    pub(crate) fn sse_pressure(&self) -> &tokio::sync::Notify {
        &self.0.sse_pressure
    }

    pub(crate) fn stop(&self) -> &CancellationToken {
        &self.0.stop
    }

    pub(crate) fn event_keys(&self) -> &EventKeys {
        &self.0.event_keys
    }

    pub(crate) fn tokens_in_use(&self) -> &limits::TokensInUse {
        &self.0.tokens_in_use
    }

    pub(crate) fn connections(&self) -> &Arc<connections::Tracker> {
        &self.0.connections
    }
}

/// The whole application: the API (with its OpenAPI document), the console, the layers.
fn app(state: AppState) -> Router {
    let limit = state
        .options()
        .max_body_bytes
        .unwrap_or(state.bus().config().max_message_bytes);
    let options = state.options();
    let body_limits = extract::BodyLimits {
        bytes: limit,
        json_values: options.max_json_values,
        json_depth: options.max_json_depth,
        read_timeout: options.body_read_timeout,
    };
    let (api, document) = openapi::api();
    let document: Arc<str> = serde_json::to_string(&document)
        .unwrap_or_else(|e| format!("{{\"error\": \"the OpenAPI document does not encode: {e}\"}}"))
        .into();
    api.route(
        "/openapi.json",
        get(move || {
            let document = Arc::clone(&document);
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    document.to_string(),
                )
            }
        }),
    )
    .merge(console::routes())
    .fallback(ops::not_found)
    .layer(DefaultBodyLimit::max(limit))
    .layer(axum::middleware::from_fn(move |req, next| {
        extract::limit_body(body_limits, req, next)
    }))
    .layer(axum::middleware::from_fn_with_state(
        state.clone(),
        limits::per_token,
    ))
    .layer(axum::middleware::from_fn(extract::json_errors))
    .layer(axum::middleware::from_fn(ops::observe))
    .layer(axum::middleware::from_fn(connections::mark_busy))
    .layer(axum::middleware::from_fn(ops::security_headers))
    .with_state(state)
}
