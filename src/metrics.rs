//! The metrics an operator scrapes, through the [`metrics`](https://docs.rs/metrics)
//! facade: install any recorder (or enable the `prometheus` feature and call
//! `install_prometheus`) and they appear. Install it before connecting and subscribing:
//! a bus takes its publish counters when it connects, and a subscription its metric
//! handles when it is created, so one made before the recorder reports to no recorder.
//!
//! | name | kind | labels | meaning |
//! | --- | --- | --- | --- |
//! | `intracom_published_total` | counter | `service` (the bus's own), `medium`, `status` (`stored`, `duplicate`, `buffered`) | publishes |
//! | `intracom_delivered_total` | counter | `subscription` | messages handed to subscribers |
//! | `intracom_acked_total` | counter | `subscription` | acknowledgements |
//! | `intracom_delivery_latency_seconds` | histogram | | from the medium's stamp (`at`) to delivery; one observation per delivery: measured on each delivery a subscription waited for (one stamped in the same millisecond as the last measured takes that measure) and on one in 16 of a run ready back to back (the others take that measure) |
//! | `intracom_lost_total` | counter | `subscription` | messages reported lost (expired before delivery) |
//! | `intracom_claimed_total` | counter | `service` | work and requests claimed |
//! | `intracom_retried_total` | counter | `service` | failed work scheduled again |
//! | `intracom_dead_lettered_total` | counter | `reason` (`attempts`, `undeclared`, `unreadable`, `refused`) | messages moved to the dead letters |
//! | `intracom_request_seconds` | histogram | `outcome` (`done`, `error`, `timeout`) | request round trip, caller side |
//! | `intracom_fallback_total` | counter | `kind` (`idempotency`, `messages`, `scan`, `history_lost`) | fall-backs: `idempotency` the idempotency store (the medium's, or a gateway's) to memory, `messages` a gateway's message store to the outbox; once per outage |
//! | `intracom_outbox_messages` | gauge | | publishes waiting in the outbox |
//! | `intracom_queue_depth` | gauge | `queue` (`<service>/<action>`) | work waiting to be claimed, sampled by the gateway every [`SAMPLE_INTERVAL`] |
//! | `intracom_queue_in_flight` | gauge | `queue` | work held by a live worker, sampled likewise |
//! | `intracom_queue_dead_letters` | gauge | `queue` | dead letters of the queue, sampled likewise |
//! | `intracom_hub_events_total` | counter | | change events the process's MongoDB change stream read (what the server selected for it) |
//! | `intracom_hub_selections_total` | counter | | times that stream was reopened from its last token because what it selects changed (a subscription came or went) |
//! | `intracom_gateway_requests_total` | counter | `method` (`GET`, `POST`, `PUT`, `DELETE`, `PATCH`, `HEAD`, `OPTIONS`, `OTHER`), `route`, `status` | HTTP requests to the gateway |
//! | `intracom_gateway_unknown_tokens_total` | counter | | requests refused for a bearer token the gateway does not know (their log lines are rate-limited; this counts each) |
//! | `intracom_gateway_sse_clients` | gauge | | Server-Sent Events streams open |
//! | `intracom_gateway_fell_behind_total` | counter | | SSE clients ended because they read too slowly |
//! | `intracom_gateway_sse_buffered_bytes` | gauge | | bytes of events queued for SSE clients |
//! | `intracom_gateway_connections` | gauge | | connections open to the gateway |
//! | `intracom_gateway_connections_evicted_total` | counter | | idle connections closed to make room for a new one |
//! | `intracom_gateway_connections_refused_total` | counter | | connections refused at the cap, every one busy |
//! | `intracom_gateway_connections_idle_closed_total` | counter | | connections closed after the idle time-out |
//! | `intracom_gateway_limited_total` | counter | `limit` | requests refused by a limit of the gateway |
//!
//! The Prometheus exporters of this crate ([`install_prometheus`] and the gateway's
//! `/metrics`) give the `_seconds` histograms the buckets [`LATENCY_BUCKETS`], so that
//! `histogram_quantile` works on their `_bucket` series.
//!
//! `subscription` is the subscription's name (`(anonymous)` without one), except for
//! the named subscriptions of the gateway's clients, counted as `gateway:<service>`:
//! their names are chosen by HTTP clients, and a label value per name would let any
//! client grow `/metrics` without bound.

/// Publishes, by medium and status.
pub const PUBLISHED: &str = "intracom_published_total";
/// Deliveries, by subscription.
pub const DELIVERED: &str = "intracom_delivered_total";
/// Acks, by subscription.
pub const ACKED: &str = "intracom_acked_total";
/// Stamp-to-delivery latency.
pub const DELIVERY_LATENCY: &str = "intracom_delivery_latency_seconds";
/// Messages reported lost.
pub const LOST: &str = "intracom_lost_total";
/// Claims.
pub const CLAIMED: &str = "intracom_claimed_total";
/// Retries scheduled.
pub const RETRIED: &str = "intracom_retried_total";
/// Dead letters, by reason.
pub const DEAD_LETTERED: &str = "intracom_dead_lettered_total";
/// Request round trips.
pub const REQUEST_SECONDS: &str = "intracom_request_seconds";
/// Fall-backs, by kind.
pub const FALLBACK: &str = "intracom_fallback_total";
/// Outbox size.
pub const OUTBOX: &str = "intracom_outbox_messages";
/// Work waiting in a queue, by queue (sampled by the gateway).
pub const QUEUE_DEPTH: &str = "intracom_queue_depth";
/// Work held by live workers, by queue (sampled by the gateway).
pub const QUEUE_IN_FLIGHT: &str = "intracom_queue_in_flight";
/// Dead letters, by queue (sampled by the gateway).
pub const QUEUE_DEAD_LETTERS: &str = "intracom_queue_dead_letters";

/// How often the gateway samples the queues (and its own traffic, for the console).
pub const SAMPLE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The bucket bounds, in seconds, of the `_seconds` histograms in this crate's
/// Prometheus exporters.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A Prometheus exporter's builder with [`LATENCY_BUCKETS`] for the `_seconds`
/// histograms.
#[cfg(feature = "prometheus")]
pub(crate) fn prometheus_builder() -> metrics_exporter_prometheus::PrometheusBuilder {
    let builder = metrics_exporter_prometheus::PrometheusBuilder::new();
    builder
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            LATENCY_BUCKETS,
        )
        // A suffix matcher is always valid; were it not, the summaries stay.
        .unwrap_or_else(|_| metrics_exporter_prometheus::PrometheusBuilder::new())
}
/// Change events read by the process's MongoDB change stream.
pub const HUB_EVENTS: &str = "intracom_hub_events_total";
/// Reopenings of that stream for a changed selection.
pub const HUB_SELECTIONS: &str = "intracom_hub_selections_total";

/// Gateway requests, by method, route and status.
pub const GATEWAY_REQUESTS: &str = "intracom_gateway_requests_total";
/// Requests with a bearer token the gateway does not know.
pub const GATEWAY_UNKNOWN_TOKENS: &str = "intracom_gateway_unknown_tokens_total";
/// Open SSE streams of the gateway.
pub const GATEWAY_SSE_CLIENTS: &str = "intracom_gateway_sse_clients";
/// SSE clients that fell behind.
pub const GATEWAY_FELL_BEHIND: &str = "intracom_gateway_fell_behind_total";
/// Bytes queued for SSE clients.
pub const GATEWAY_SSE_BUFFERED_BYTES: &str = "intracom_gateway_sse_buffered_bytes";
/// Open connections of the gateway.
pub const GATEWAY_CONNECTIONS: &str = "intracom_gateway_connections";
/// Idle connections closed to make room for a new one (the connection cap).
pub const GATEWAY_CONNECTIONS_EVICTED: &str = "intracom_gateway_connections_evicted_total";
/// Connections refused at once: at the cap, with every connection busy.
pub const GATEWAY_CONNECTIONS_REFUSED: &str = "intracom_gateway_connections_refused_total";
/// Connections closed after the idle time-out.
pub const GATEWAY_CONNECTIONS_IDLE_CLOSED: &str = "intracom_gateway_connections_idle_closed_total";
/// Requests refused by the gateway's limits, by limit.
pub const GATEWAY_LIMITED: &str = "intracom_gateway_limited_total";

/// Serves every intracom metric for Prometheus at `http://<addr>/metrics`.
/// Needs the `prometheus` feature and a running tokio runtime.
#[cfg(feature = "prometheus")]
#[cfg_attr(docsrs, doc(cfg(feature = "prometheus")))]
pub fn install_prometheus(addr: std::net::SocketAddr) -> crate::Result<()> {
    prometheus_builder()
        .with_http_listener(addr)
        .install()
        .map_err(|e| crate::Error::Unsupported {
            medium: "prometheus".into(),
            what: format!("installing the exporter on {addr}: {e}"),
        })
}
