//! `GET /stats`: what the web console's stats panel shows, in one JSON document.
//!
//! Why it exists: an operator wants the state of the bus at a glance: how many messages
//! by service, action, type and state; queue depths; how far each named subscription
//! lags; how long deliveries through this gateway take (latency
//! monitoring). Counts come from the medium, latency from the deliveries this gateway
//! streamed (the last [`LATENCY_WINDOW`]). Admin tokens only.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::Admin;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::queues::{all_queues, Queue};
use super::AppState;

/// How many recent deliveries the latency figures cover.
pub const LATENCY_WINDOW: usize = 1024;

/// Delivery latencies of this gateway: from the medium's stamp (`at`) to the moment the
/// event was handed to the client's HTTP response, for live deliveries only (messages
/// stamped after the client connected: a replay's backlog has an age, not a latency).
#[derive(Default)]
pub(crate) struct Latency {
    window: Mutex<(VecDeque<u64>, u64)>,
}

impl Latency {
    pub(crate) fn record(&self, at: bson::DateTime) {
        let ms = (bson::DateTime::now().timestamp_millis() - at.timestamp_millis()).max(0) as u64;
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if window.0.len() == LATENCY_WINDOW {
            window.0.pop_front();
        }
        window.0.push_back(ms);
        window.1 += 1;
    }

    fn summary(&self) -> LatencyJson {
        let (mut samples, delivered) = {
            let window = self.window.lock().unwrap_or_else(|p| p.into_inner());
            (window.0.iter().copied().collect::<Vec<_>>(), window.1)
        };
        samples.sort_unstable();
        let at = |q: f64| -> Option<u64> {
            let last = samples.len().checked_sub(1)?;
            samples.get(((last as f64) * q).round() as usize).copied()
        };
        LatencyJson {
            delivered,
            samples: samples.len() as u64,
            p50_ms: at(0.5),
            p90_ms: at(0.9),
            p99_ms: at(0.99),
            max_ms: samples.last().copied(),
        }
    }
}

/// Delivery latency through this gateway, over the last live deliveries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LatencyJson {
    /// Live messages handed to clients since the gateway started.
    pub delivered: u64,
    /// How many of the last ones the figures cover.
    pub samples: u64,
    /// Median, ms.
    #[serde(rename = "p50Ms")]
    pub p50_ms: Option<u64>,
    /// 90th percentile, ms.
    #[serde(rename = "p90Ms")]
    pub p90_ms: Option<u64>,
    /// 99th percentile, ms.
    #[serde(rename = "p99Ms")]
    pub p99_ms: Option<u64>,
    /// Slowest, ms.
    #[serde(rename = "maxMs")]
    pub max_ms: Option<u64>,
}

/// A count by key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Count {
    /// The service, action, type or state.
    pub key: String,
    /// How many messages.
    pub count: u64,
}

/// How far a named subscription is behind the newest message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Lag {
    /// The subscription name.
    pub subscription: String,
    /// Messages after its checkpoint (whatever its filter).
    pub messages: u64,
    /// Seconds between its checkpoint and the newest message.
    pub seconds: u64,
}

/// Counts over the messages the medium retains.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Counts {
    /// Messages retained.
    pub total: u64,
    /// By sending service, largest first.
    #[serde(rename = "byService")]
    pub by_service: Vec<Count>,
    /// By action, largest first.
    #[serde(rename = "byAction")]
    pub by_action: Vec<Count>,
    /// By type.
    #[serde(rename = "byType")]
    pub by_type: Vec<Count>,
    /// By request/work state.
    #[serde(rename = "byState")]
    pub by_state: Vec<Count>,
    /// Pending work, all queues together.
    #[serde(rename = "queueDepth")]
    pub queue_depth: u64,
    /// Dead letters.
    pub dead: u64,
}

/// The state of the bus, for the console.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StatsJson {
    /// The medium (`memory`, `db`, `mqtt`).
    pub medium: String,
    /// Counts, when the medium provides them.
    #[serde(default)]
    pub counts: Option<Counts>,
    /// The queues, when the medium counts them.
    #[serde(default)]
    pub queues: Option<Vec<Queue>>,
    /// Each named subscription's lag.
    pub lag: Vec<Lag>,
    /// Delivery latency through this gateway.
    pub latency: LatencyJson,
    /// Publishes waiting in this gateway's outbox.
    pub outbox: u64,
    /// Server-Sent Events streams open now.
    #[serde(rename = "sseClients")]
    pub sse_clients: u64,
    /// Bytes of events queued in this gateway for SSE clients now, all streams
    /// together (each stream at most `sse_buffer_bytes`, or one larger event).
    #[serde(rename = "sseBufferedBytes")]
    pub sse_buffered_bytes: u64,
    /// Connections open to this gateway now (this one included).
    #[serde(default)]
    pub connections: u64,
    /// Tokens holding a request in progress or an SSE stream now.
    #[serde(rename = "tokensInUse", default)]
    pub tokens_in_use: u64,
    /// Why counts or queues are missing: the medium's error while it is unavailable.
    #[serde(
        rename = "mediumError",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub medium_error: Option<String>,
}

fn rows(rows: Vec<(String, u64)>) -> Vec<Count> {
    rows.into_iter()
        .map(|(key, count)| Count { key, count })
        .collect()
}

/// A view the medium does not provide is left out; so is one it cannot give now (it is
/// unavailable: the error is noted, and the rest of the stats, which the operator needs
/// most then, is still shown). Other errors fail.
fn optional<T>(result: ApiResult<T>, noted: &mut Option<String>) -> ApiResult<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(ApiError::Bus(crate::Error::Unsupported { .. })) => Ok(None),
        Err(ApiError::Bus(error)) if error.is_retryable() => {
            noted.get_or_insert_with(|| error.to_string());
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

/// Counts, queues, lag, latency: the console's stats panel.
#[utoipa::path(
    get,
    path = "/stats",
    tag = "operations",
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, description = "The state of the bus", body = StatsJson),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Not an admin token", body = ErrorBody),
    )
)]
pub(crate) async fn stats(
    State(state): State<AppState>,
    _admin: Admin,
) -> ApiResult<axum::Json<StatsJson>> {
    let bus = state.bus();
    let mut medium_error = None;
    let medium_stats = optional(
        bus.medium().stats().await.map_err(ApiError::from),
        &mut medium_error,
    )?;
    let queues = optional(all_queues(&state).await, &mut medium_error)?;
    let (counts, lag) = match medium_stats {
        Some(s) => (
            Some(Counts {
                total: s.total,
                by_service: rows(s.by_service),
                by_action: rows(s.by_action),
                by_type: rows(s.by_type),
                by_state: rows(s.by_state),
                queue_depth: s.queue_depth,
                dead: s.dead,
            }),
            s.lag
                .into_iter()
                .map(|(subscription, messages, seconds)| Lag {
                    subscription,
                    messages,
                    seconds,
                })
                .collect(),
        ),
        None => (None, Vec::new()),
    };
    Ok(axum::Json(StatsJson {
        medium: bus.medium().name().to_string(),
        counts,
        queues,
        lag,
        latency: state.latency().summary(),
        outbox: bus.outbox_len() as u64,
        sse_clients: state.sse_clients().load(Ordering::Relaxed) as u64,
        sse_buffered_bytes: state.sse_buffered_bytes().load(Ordering::Relaxed),
        connections: state.connections().open() as u64,
        tokens_in_use: state.tokens_in_use().len() as u64,
        medium_error,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_keeps_the_last_deliveries() {
        let latency = Latency::default();
        assert_eq!(latency.summary().p50_ms, None);
        let now = bson::DateTime::now().timestamp_millis();
        for ms in 0..(LATENCY_WINDOW as i64 + 10) {
            latency.record(bson::DateTime::from_millis(now - 1000 - ms));
        }
        let summary = latency.summary();
        assert_eq!(summary.delivered, LATENCY_WINDOW as u64 + 10);
        assert_eq!(summary.samples, LATENCY_WINDOW as u64);
        // The oldest (smallest ages) were dropped: every figure is at least 1010 ms.
        assert!(
            summary.p50_ms.unwrap() >= 1010 && summary.max_ms.unwrap() >= summary.p99_ms.unwrap()
        );
    }
}
