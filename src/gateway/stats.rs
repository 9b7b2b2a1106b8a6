//! `GET /stats`: what the web console's stats panel shows, in one JSON document.
//!
//! Why it exists: an operator wants the state of the bus at a glance: how many messages
//! by service, action, type and state; queue depths; how far each named subscription
//! lags; how long deliveries through this gateway take (latency
//! monitoring); and how these moved over the last minutes (the console's charts).
//! Counts come from the medium, latency from the deliveries this gateway streamed (the
//! last [`LATENCY_WINDOW`]), the series from a sampler that runs every
//! [`SAMPLE_INTERVAL`] for as long as the gateway does (it also sets the queue gauges
//! of `/metrics`). Admin tokens only.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::Admin;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::queues::{all_queues, Queue};
use super::AppState;
use crate::metrics::SAMPLE_INTERVAL;

/// How many recent deliveries the latency figures cover.
pub(crate) const LATENCY_WINDOW: usize = 1024;

/// How many samples the series keeps: ten minutes at [`SAMPLE_INTERVAL`].
pub const SERIES_LEN: usize = 120;

/// Delivery latencies of this gateway: from the medium's stamp (`at`) to the moment the
/// event was handed to the client's HTTP response, for live deliveries only (messages
/// stamped after the client connected: a replay's backlog has an age, not a latency).
#[derive(Default)]
pub(crate) struct Latency {
    window: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    /// The last [`LATENCY_WINDOW`] latencies, ms.
    last: VecDeque<u64>,
    /// Live deliveries since the start.
    delivered: u64,
    /// The latencies since the sampler last took them (the last [`LATENCY_WINDOW`]).
    interval: VecDeque<u64>,
}

/// The `q`-quantile of sorted `samples`.
fn quantile(samples: &[u64], q: f64) -> Option<u64> {
    let last = samples.len().checked_sub(1)?;
    samples.get(((last as f64) * q).round() as usize).copied()
}

impl Latency {
    pub(crate) fn record(&self, at: bson::DateTime) {
        let ms = (bson::DateTime::now().timestamp_millis() - at.timestamp_millis()).max(0) as u64;
        let mut guard = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let window = &mut *guard;
        for kept in [&mut window.last, &mut window.interval] {
            if kept.len() == LATENCY_WINDOW {
                kept.pop_front();
            }
            kept.push_back(ms);
        }
        window.delivered += 1;
    }

    fn summary(&self) -> LatencyJson {
        let (mut samples, delivered) = {
            let window = self.window.lock().unwrap_or_else(|p| p.into_inner());
            (
                window.last.iter().copied().collect::<Vec<_>>(),
                window.delivered,
            )
        };
        samples.sort_unstable();
        LatencyJson {
            delivered,
            samples: samples.len() as u64,
            p50_ms: quantile(&samples, 0.5),
            p90_ms: quantile(&samples, 0.9),
            p99_ms: quantile(&samples, 0.99),
            max_ms: samples.last().copied(),
        }
    }

    /// The live deliveries since the start, and the latencies (sorted) recorded since
    /// the last call.
    fn take_interval(&self) -> (u64, Vec<u64>) {
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let mut taken: Vec<u64> = window.interval.drain(..).collect();
        taken.sort_unstable();
        (window.delivered, taken)
    }
}

/// One point of the console's charts: what moved through this gateway in the interval
/// that ends at `at`, and the queues then.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Sample {
    /// When it was taken, ms since the Unix epoch.
    pub at: i64,
    /// Milliseconds since the sample before (0 for the first).
    #[serde(rename = "intervalMs")]
    pub interval_ms: u64,
    /// Messages published through this gateway's `/publish` in the interval.
    pub published: u64,
    /// Live messages handed to this gateway's SSE clients in the interval.
    pub delivered: u64,
    /// Work waiting in all queues together, when the medium answered.
    #[serde(rename = "queueDepth")]
    pub queue_depth: Option<u64>,
    /// Median delivery latency of the interval's live deliveries, ms.
    #[serde(rename = "p50Ms")]
    pub p50_ms: Option<u64>,
    /// 99th percentile of the same, ms.
    #[serde(rename = "p99Ms")]
    pub p99_ms: Option<u64>,
    /// Publishes waiting in this gateway's outbox.
    pub outbox: u64,
}

/// The series of [`Sample`]s, and the counts the sampler reads.
#[derive(Default)]
pub(crate) struct Series {
    /// Publishes through `/publish` since the start.
    published: AtomicU64,
    samples: Mutex<VecDeque<Sample>>,
}

impl Series {
    /// Counts a publish through `/publish`.
    pub(crate) fn published(&self) {
        self.published.fetch_add(1, Ordering::Relaxed);
    }

    fn push(&self, sample: Sample) {
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() == SERIES_LEN {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    fn snapshot(&self) -> Vec<Sample> {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples.iter().cloned().collect()
    }
}

/// What the sampler remembers between two samples.
#[derive(Default)]
struct Last {
    at: Option<i64>,
    published: u64,
    delivered: u64,
    /// The queues whose gauges were set (set to 0 when they are gone).
    queues: Vec<String>,
}

/// Starts the sampler of `state`'s gateway, on the current tokio runtime (none: no
/// series). It ends when the gateway stops or is dropped.
pub(crate) fn spawn_sampler(state: &AppState) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::debug!("gateway: no tokio runtime: the console's series is not sampled");
        return;
    };
    let weak = Arc::downgrade(&state.0);
    let stop = state.stop().clone();
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = Last::default();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Some(inner) = weak.upgrade() else { return };
            sample(&AppState(inner), &mut last).await;
        }
    });
}

/// Takes one sample: the counts since the last, the queues (setting their gauges).
async fn sample(state: &AppState, last: &mut Last) {
    let medium = state.bus().medium();
    let Some(inspection) = medium.inspection() else {
        return;
    };
    let queues = tokio::time::timeout(SAMPLE_INTERVAL, inspection.queues()).await;
    let queue_depth = match queues {
        Ok(Ok(queues)) => {
            let mut seen = Vec::with_capacity(queues.len());
            for q in &queues {
                let id = format!("{}/{}", q.service, q.action);
                metrics::gauge!(crate::metrics::QUEUE_DEPTH, "queue" => id.clone())
                    .set(q.depth as f64);
                metrics::gauge!(crate::metrics::QUEUE_IN_FLIGHT, "queue" => id.clone())
                    .set(q.in_flight as f64);
                metrics::gauge!(crate::metrics::QUEUE_DEAD_LETTERS, "queue" => id.clone())
                    .set(q.dead as f64);
                seen.push(id);
            }
            for gone in last.queues.iter().filter(|id| !seen.contains(id)) {
                for name in [
                    crate::metrics::QUEUE_DEPTH,
                    crate::metrics::QUEUE_IN_FLIGHT,
                    crate::metrics::QUEUE_DEAD_LETTERS,
                ] {
                    metrics::gauge!(name, "queue" => gone.clone()).set(0.0);
                }
            }
            last.queues = seen;
            Some(queues.iter().map(|q| q.depth).sum())
        }
        // Unavailable, unsupported or slow: no figure this time.
        Ok(Err(_)) | Err(_) => None,
    };
    let now = bson::DateTime::now().timestamp_millis();
    let published = state.series().published.load(Ordering::Relaxed);
    let (delivered, latencies) = state.latency().take_interval();
    let sample = Sample {
        at: now,
        interval_ms: last.at.map_or(0, |at| (now - at).max(0) as u64),
        published: published.saturating_sub(last.published),
        delivered: delivered.saturating_sub(last.delivered),
        queue_depth,
        p50_ms: quantile(&latencies, 0.5),
        p99_ms: quantile(&latencies, 0.99),
        outbox: state.bus().outbox_len() as u64,
    };
    last.at = Some(now);
    last.published = published;
    last.delivered = delivered;
    state.series().push(sample);
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
    /// What moved over the last minutes: one sample every 5 s, oldest first, the
    /// last ten minutes.
    #[serde(default)]
    pub series: Vec<Sample>,
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
        match bus.medium().inspection_or_unsupported("stats") {
            Ok(inspection) => inspection.stats().await,
            Err(unsupported) => Err(unsupported),
        }
        .map_err(ApiError::from),
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
        series: state.series().snapshot(),
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
        // The interval's latencies are taken once.
        let (delivered, taken) = latency.take_interval();
        assert_eq!(
            (delivered, taken.len()),
            (LATENCY_WINDOW as u64 + 10, LATENCY_WINDOW)
        );
        assert!(taken.windows(2).all(|w| w[0] <= w[1]), "sorted");
        assert!(latency.take_interval().1.is_empty());
    }

    #[test]
    fn the_series_keeps_the_last_samples() {
        let series = Series::default();
        for at in 0..(SERIES_LEN as i64 + 5) {
            series.push(Sample {
                at,
                interval_ms: 0,
                published: 0,
                delivered: 0,
                queue_depth: None,
                p50_ms: None,
                p99_ms: None,
                outbox: 0,
            });
        }
        let kept = series.snapshot();
        assert_eq!(kept.len(), SERIES_LEN);
        assert_eq!(
            (kept[0].at, kept[SERIES_LEN - 1].at),
            (5, SERIES_LEN as i64 + 4)
        );
    }
}
