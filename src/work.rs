//! Request/reply and work queues on top of the bus.
//!
//! Why it exists: besides broadcasts, services call each other and hand out work that
//! exactly one instance must do. Both are `delivery: one` messages with
//! `state: pending`:
//!
//! - a worker of the target service **claims** the message atomically, with a lease
//!   (owner, until) that it renews while its handler runs (a heartbeat, so a long job is
//!   not taken away from a live worker);
//! - it **settles** the message in place: `state: done` with `result`, or
//!   `state: error` with `response`, and `response_ts`. An admin sees the outcome in
//!   the request document itself;
//! - a request's handler error is final and reaches the caller; a work item's handler
//!   error is retried after an exponential back-off, and after `max_attempts` the item
//!   moves to the dead letters with its last error;
//! - a worker that dies holding a lease does not block the work: the lease expires and
//!   another worker claims it (the claim counts the attempt).
//!
//! A caller of [`Intracom::request`] waits for the outcome with a time-out; when it
//! passes, the request is marked `state: error` ("timed out") and the caller gets
//! [`Error::Timeout`]. A caller that stops waiting first (drops the request's future)
//! marks it `state: error` ("abandoned") the same way, so that no worker runs it for
//! no one. A handler served in the same process is called directly (the local route),
//! and the settled request is still written to the medium as a
//! record.

use std::collections::BTreeSet;
use std::fmt;
use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bson::{doc, Bson, Document};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::bus::{Intracom, Prepared};
use crate::config::WorkOverrides;
use crate::delivery::routes::Handler;
use crate::error::{Error, PayloadError, Result};
use crate::filter::{Filter, StartFrom};
use crate::medium::{ClaimRequest, Settlement};
use crate::message::{now_nanos, to_document, DeliveryMode, Message, MessageType, State};
use crate::trace::TraceContext;

/// How a worker treats its work. Defaults in the field docs; config can override them
/// per action (`common.intracom.work.<action>.lease_ms`, `.backoff_ms`, `.max_attempts`).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct WorkOptions {
    /// Lease length; renewed every third of it while the handler runs (default 30 s).
    pub lease: Duration,
    /// First retry pause, doubled at each attempt (default 1 s).
    pub backoff: Duration,
    /// Longest retry pause (default 60 s).
    pub max_backoff: Duration,
    /// Attempts before the work goes to the dead letters (default 5).
    pub max_attempts: i32,
    /// How often an idle worker looks for expired leases and due retries (default 1 s).
    pub poll: Duration,
}

impl Default for WorkOptions {
    fn default() -> Self {
        WorkOptions {
            lease: Duration::from_secs(30),
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            max_attempts: 5,
            poll: Duration::from_secs(1),
        }
    }
}

impl WorkOptions {
    /// Sets the lease length.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets the first retry pause.
    pub fn backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets the number of attempts before the dead letters.
    pub fn max_attempts(mut self, attempts: i32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Sets the idle poll period.
    pub fn poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// The pause before attempt `attempts + 1`.
    fn pause_after(&self, attempts: i32) -> Duration {
        let retries = u32::try_from(attempts.saturating_sub(1)).unwrap_or(0);
        crate::backoff::Policy::new(self.backoff, self.max_backoff).ceiling(retries)
    }
}

impl WorkOverrides {
    /// `options` with these overrides applied.
    pub fn apply(&self, mut options: WorkOptions) -> WorkOptions {
        if let Some(lease) = self.lease {
            options.lease = lease;
        }
        if let Some(backoff) = self.backoff {
            options.backoff = backoff;
        }
        if let Some(attempts) = self.max_attempts {
            options.max_attempts = attempts;
        }
        options
    }
}

/// Whether a worker answers requests (errors are final) or does work (errors retry).
#[derive(Clone, Copy, PartialEq)]
enum Policy {
    Requests,
    Work,
}

/// A running worker (from [`Intracom::serve`] or [`Intracom::work`]). It runs until
/// [`Worker::stop`] or the bus shuts down; dropping the handle leaves it running.
#[must_use = "a worker runs until stopped or the bus shuts down; keep the handle to stop it"]
pub struct Worker {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    routes: Vec<(String, String)>,
    bus: Intracom,
}

impl Worker {
    /// Stops claiming; the work in hand is finished first.
    pub async fn stop(self) {
        for (service, action) in &self.routes {
            self.bus.shared().routes.remove(service, action);
        }
        self.stop.cancel();
        if let Err(error) = self.task.await {
            tracing::warn!(%error, "worker task ended abnormally");
        }
    }
}

impl Worker {
    /// Stops at once, abandoning the work in hand as a crash would: its lease is no
    /// longer renewed, and once it runs out another worker claims the work.
    pub fn abort(self) {
        for (service, action) in &self.routes {
            self.bus.shared().routes.remove(service, action);
        }
        self.task.abort();
    }
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("routes", &self.routes)
            .finish()
    }
}

/// A request on its way: await it for the typed answer. Built by [`Intracom::request`].
#[must_use = "a request does nothing until awaited"]
pub struct Request<R> {
    bus: Intracom,
    service: String,
    action: String,
    query: Result<Document>,
    timeout: Duration,
    kind: MessageType,
    trace: Option<TraceContext>,
    _answer: PhantomData<fn() -> R>,
}

impl<R> Request<R> {
    /// How long to wait for the answer (default `common.intracom.request_timeout_ms`,
    /// 30 s). Written as `query_ms` in the request.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Carries this trace context instead of the one the publish would store (the
    /// current span's, with the feature `otel`): the handler's span is its child.
    pub fn trace(mut self, trace: TraceContext) -> Self {
        self.trace = Some(trace);
        self
    }

    /// Marks the request `type: async` instead of `sync` (the caller still awaits).
    pub fn asynchronous(mut self) -> Self {
        self.kind = MessageType::Async;
        self
    }
}

impl<R: DeserializeOwned + Send + 'static> IntoFuture for Request<R> {
    type Output = Result<R>;
    type IntoFuture = BoxFuture<'static, Result<R>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

impl<R: DeserializeOwned> Request<R> {
    async fn run(self) -> Result<R> {
        let started = std::time::Instant::now();
        let span = tracing::debug_span!(
            "request",
            service = %self.service,
            action = %self.action,
            message_id = tracing::field::Empty
        );
        let outcome = self.exchange().instrument(span).await;
        let label = match &outcome {
            Ok(_) => "done",
            Err(Error::Timeout { .. }) => "timeout",
            Err(_) => "error",
        };
        metrics::histogram!(crate::metrics::REQUEST_SECONDS, "outcome" => label)
            .record(started.elapsed().as_secs_f64());
        outcome
    }

    async fn exchange(self) -> Result<R> {
        let bus = self.bus;
        let mut message = Message::to_service(&self.service, &self.action)
            .body(self.query?)
            .kind(self.kind);
        message.delivery = DeliveryMode::One;
        message.state = Some(State::Pending);
        message.query_id = Some(message.id.clone());
        message.query_ms = Some(i64::try_from(self.timeout.as_millis()).unwrap_or(i64::MAX));
        message.trace = self.trace;
        let prepared = bus.prepare(message).await?;
        let id = prepared.message.id.clone();
        tracing::Span::current().record("message_id", id.as_str());

        if let Some(handler) = bus.shared().routes.get(&self.service, &self.action) {
            // The local route: call the handler here, and keep the record.
            tracing::debug!(message_id = %id, "local route");
            let outcome = run_handler(&handler, prepared.message.clone()).await;
            let mut record = prepared.message;
            record.response_ts = Some(now_nanos());
            match &outcome {
                Ok(result) => {
                    record.state = Some(State::Done);
                    record.result.clone_from(result);
                }
                Err(error) => {
                    record.state = Some(State::Error);
                    record.response = Some(doc! { "error": error });
                }
            }
            let record = Prepared::for_medium(record, &**bus.medium())?;
            bus.append_prepared(vec![record]).await?;
            return match outcome {
                Ok(result) => decode_result(result),
                Err(message) => Err(Error::Remote {
                    service: self.service,
                    action: self.action,
                    message,
                }),
            };
        }

        // The time-out covers the whole request, including a medium that waits for a
        // worker to be present before it sends (MQTT).
        let deadline = crate::deadline::after(self.timeout);
        let medium = bus.medium();
        let work = medium.work_or_unsupported()?;
        bus.append_prepared(vec![prepared]).await?;
        // From here until the outcome is known, a caller that stops waiting (drops this
        // future: an HTTP client of the gateway that went away) leaves a request no one
        // will read the answer of: it is marked abandoned, so no worker runs it.
        let abandon = Abandon {
            medium: Some(Arc::clone(medium)),
            id: id.clone(),
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let outcome = work.await_outcome(&id, left).await;
        abandon.disarm();
        let settled = match outcome? {
            Some(settled) => settled,
            None => {
                let timeout_ms = i64::try_from(self.timeout.as_millis()).unwrap_or(i64::MAX);
                let marked = work
                    .settle(
                        &id,
                        None,
                        Settlement::Failed(doc! { "error": "timed out", "timeout_ms": timeout_ms }),
                    )
                    .await;
                tracing::warn!(message_id = %id, timeout_ms, marked = ?marked, "request timed out");
                // The mark holds only while the request is pending: refused, it was
                // settled by its handler between the wait's end and the mark. Its
                // outcome is the answer (a time-out here would contradict the stored
                // `done`).
                let late = match marked {
                    Ok(false) => work.await_outcome(&id, SETTLED_READ).await.ok().flatten(),
                    _ => None,
                };
                match late {
                    Some(settled) => settled,
                    None => {
                        return Err(Error::Timeout {
                            service: self.service,
                            action: self.action,
                            after: self.timeout,
                        })
                    }
                }
            }
        };
        if settled.state == Some(State::Done) {
            return decode_result(settled.result);
        }
        Err(Error::Remote {
            service: self.service,
            action: self.action,
            message: settled
                .response
                .as_ref()
                .and_then(|r| r.get_str("error").ok())
                .unwrap_or("the handler failed")
                .to_string(),
        })
    }
}

/// How long a caller whose time-out mark was refused (the request was settled just
/// before it) waits to read the settled outcome.
const SETTLED_READ: std::time::Duration = std::time::Duration::from_secs(2);

/// Marks a request `state: error` with `response: {error: "abandoned"}` when dropped
/// armed: its caller stopped waiting before the outcome was known. Written like a
/// time-out (a settle without an owner, which holds only while the request is still
/// `pending`): a worker claims only pending requests, and one that claimed it already
/// can no longer settle it. Best effort: the mark is written by a task of its own, and
/// a worker that claims the request before it lands still runs it.
struct Abandon {
    medium: Option<Arc<dyn crate::medium::Medium>>,
    id: String,
}

impl Abandon {
    /// The outcome is known (or the error is the caller's to see): nothing to mark.
    fn disarm(mut self) {
        self.medium = None;
    }
}

impl Drop for Abandon {
    fn drop(&mut self) {
        let Some(medium) = self.medium.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(message_id = %self.id, "request abandoned by its caller outside a runtime: left pending");
            return;
        };
        let id = std::mem::take(&mut self.id);
        runtime.spawn(async move {
            let Some(work) = medium.work() else {
                return;
            };
            let marked = work
                .settle(
                    &id,
                    None,
                    Settlement::Failed(doc! {
                        "error": "abandoned",
                        "reason": "the caller stopped waiting before the answer",
                    }),
                )
                .await;
            match marked {
                Ok(marked) => {
                    tracing::info!(message_id = %id, marked, "request abandoned by its caller")
                }
                Err(error) => {
                    tracing::warn!(message_id = %id, %error, "request abandoned by its caller: not marked")
                }
            }
        });
    }
}

/// A handler's result as stored: documents as they are, other values as `{value: …}`,
/// nothing (unit, `None`) as no result.
fn encode_result<R: Serialize>(value: &R) -> std::result::Result<Option<Document>, String> {
    match bson::to_bson(value).map_err(|e| format!("cannot encode the result: {e}"))? {
        Bson::Document(d) => Ok(Some(d)),
        Bson::Null => Ok(None),
        other => Ok(Some(doc! { "value": other })),
    }
}

fn decode_result<R: DeserializeOwned>(result: Option<Document>) -> Result<R> {
    let Some(document) = result else {
        return bson::from_bson(Bson::Null).map_err(|e| PayloadError::from(e).into());
    };
    match bson::from_bson(Bson::Document(document.clone())) {
        Ok(value) => Ok(value),
        Err(first) => match (document.len(), document.get("value")) {
            (1, Some(value)) => {
                bson::from_bson(value.clone()).map_err(|e| PayloadError::from(e).into())
            }
            _ => Err(PayloadError::from(first).into()),
        },
    }
}

async fn run_handler(
    handler: &Handler,
    message: Message,
) -> std::result::Result<Option<Document>, String> {
    // In a span whose parent is the requester's or publisher's trace context.
    let span = crate::trace::process_span(&message);
    let handled = span.in_scope(|| handler(message));
    match AssertUnwindSafe(handled.instrument(span))
        .catch_unwind()
        .await
    {
        Ok(outcome) => outcome,
        Err(_) => Err("the handler panicked".into()),
    }
}

impl Intracom {
    /// Calls `action` of `service` and waits for the typed answer.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use intracom::{Config, Intracom};
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct Query { invoice: i64 }
    /// #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    /// struct Invoice { invoice: i64, total: f64 }
    ///
    /// let bus = Intracom::connect(Config::builder().service("web").sender("web", Vec::<String>::new())
    ///     .sender("billing", ["invoice.get"]).build()?).await?;
    /// let billing = bus.as_service("billing", None)?;
    /// let _worker = billing.serve("billing", "invoice.get", |q: Query| async move {
    ///     Ok::<_, String>(Invoice { invoice: q.invoice, total: 12.5 })
    /// })?;
    /// let answer: Invoice = bus.request("billing", "invoice.get", &Query { invoice: 7 })
    ///     .timeout(Duration::from_secs(2))
    ///     .await?;
    /// assert_eq!(answer, Invoice { invoice: 7, total: 12.5 });
    /// # bus.shutdown().await;
    /// # Ok::<(), intracom::Error>(()) }).unwrap();
    /// ```
    pub fn request<Q: Serialize + ?Sized, R>(
        &self,
        service: &str,
        action: &str,
        query: &Q,
    ) -> Request<R> {
        Request {
            bus: self.clone(),
            service: service.to_string(),
            action: action.to_string(),
            query: to_document(query),
            timeout: Duration::from_millis(self.config().request_timeout_ms),
            kind: MessageType::Sync,
            trace: None,
            _answer: PhantomData,
        }
    }

    /// Answers requests for `action` of `service`: exactly one instance answers each
    /// request, whatever number of instances serve it. The handler's `Ok` is the
    /// caller's answer; its `Err` reaches the caller as [`Error::Remote`]. Requests made
    /// in this process call the handler directly.
    pub fn serve<Q, R, E, F, Fut>(&self, service: &str, action: &str, handler: F) -> Result<Worker>
    where
        Q: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        E: fmt::Display + Send + 'static,
        F: Fn(Q) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<R, E>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased: Handler = Arc::new(move |message: Message| {
            let handler = Arc::clone(&handler);
            Box::pin(async move {
                let query: Q = message.decode().map_err(|e| format!("bad query: {e}"))?;
                let answer = handler(query).await.map_err(|e| e.to_string())?;
                encode_result(&answer)
            })
        });
        self.shared()
            .routes
            .insert(service, action, Arc::clone(&erased));
        let options = self.work_options(action);
        self.spawn_worker(
            service,
            vec![action.to_string()],
            options,
            Policy::Requests,
            erased,
        )
    }

    /// Does work (`delivery: one` messages, see [`Message::work`]) for `actions` of
    /// `service`. Each item is handled by exactly one worker; a handler `Err` retries the
    /// item after a back-off, and after `max_attempts` it goes to the dead letters.
    /// Options given in config for an action (`common.intracom.work.<action>.*`) win over
    /// `options`.
    pub fn work<E, F, Fut>(
        &self,
        service: &str,
        actions: &[&str],
        options: WorkOptions,
        handler: F,
    ) -> Result<Worker>
    where
        E: fmt::Display + Send + 'static,
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased: Handler = Arc::new(move |message: Message| {
            let handler = Arc::clone(&handler);
            Box::pin(async move {
                handler(message)
                    .await
                    .map(|()| None)
                    .map_err(|e| e.to_string())
            })
        });
        let mut options = options;
        for action in actions {
            if let Some(overrides) = self.config().work.get(*action) {
                options = overrides.apply(options);
            }
        }
        self.spawn_worker(
            service,
            actions.iter().map(|a| a.to_string()).collect(),
            options,
            Policy::Work,
            erased,
        )
    }

    fn work_options(&self, action: &str) -> WorkOptions {
        let options = WorkOptions::default();
        match self.config().work.get(action) {
            Some(overrides) => overrides.apply(options),
            None => options,
        }
    }

    fn spawn_worker(
        &self,
        service: &str,
        actions: Vec<String>,
        options: WorkOptions,
        policy: Policy,
        handler: Handler,
    ) -> Result<Worker> {
        if self.is_shut_down() {
            return Err(Error::Shutdown);
        }
        crate::message::check_name("service", service)?;
        for action in &actions {
            crate::message::check_name("action", action)?;
        }
        self.medium().work_or_unsupported()?;
        let stop = CancellationToken::new();
        let routes = match policy {
            Policy::Requests => actions
                .iter()
                .map(|a| (service.to_string(), a.clone()))
                .collect(),
            Policy::Work => Vec::new(),
        };
        let worker = WorkerLoop {
            bus: self.clone(),
            // The lease names the worker, not just the instance: two workers of one
            // process that take the same work (one's lease lapsed while its handler ran)
            // must not renew and settle each other's claim.
            claim: ClaimRequest::new(
                service,
                actions,
                format!("{}/{}", self.instance(), crate::message::new_id()),
                options.lease,
            ),
            options,
            policy,
            handler,
            stop: stop.clone(),
        };
        let task = tokio::spawn(worker.run());
        Ok(Worker {
            stop,
            task,
            routes,
            bus: self.clone(),
        })
    }
}

struct WorkerLoop {
    bus: Intracom,
    claim: ClaimRequest,
    options: WorkOptions,
    policy: Policy,
    handler: Handler,
    stop: CancellationToken,
}

impl WorkerLoop {
    async fn run(self) {
        let medium = Arc::clone(self.bus.medium());
        let Some(work) = medium.work() else {
            return;
        };
        let shutdown = self.bus.shutdown_token();
        if !medium.capabilities().stored_queue {
            return self.run_pushed().await;
        }
        // New work wakes the worker; the poll catches expired leases and due retries.
        let filter = Filter {
            service: Some(self.claim.service.clone()),
            actions: Some(self.claim.actions.iter().cloned().collect::<BTreeSet<_>>()),
            work: true,
            ..Filter::default()
        };
        let mut wake = match medium.follow(StartFrom::Now, filter).await {
            Ok(events) => Some(events),
            Err(error) => {
                tracing::warn!(%error, "worker cannot follow new work: polling only");
                None
            }
        };
        let mut failures = 0u32;
        loop {
            if self.stop.is_cancelled() || shutdown.is_cancelled() {
                return;
            }
            // The claim below answers every wake-up already waiting: new work that
            // arrived while a job was handled must not cost one futile claim each.
            if let Some(events) = wake.as_mut() {
                while let Some(Some(_)) = events.next().now_or_never() {}
            }
            match work.claim(&self.claim).await {
                Ok(Some(message)) => {
                    failures = 0;
                    self.process(message).await;
                    continue;
                }
                Ok(None) => failures = 0,
                Err(Error::Shutdown) => return,
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%error, service = %self.claim.service, "claim failed");
                }
            }
            let pause = if failures > 0 {
                self.options.poll.saturating_mul(failures.min(10))
            } else {
                self.options.poll
            };
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
                event = async {
                    match wake.as_mut() {
                        Some(events) => events.next().await,
                        None => std::future::pending().await,
                    }
                } => if event.is_none() { wake = None },
            }
        }
    }

    /// On a medium that pushes work to one worker (MQTT): take what it hands out, in
    /// order; subscribe again (with a pause) if the subscription fails or ends.
    async fn run_pushed(self) {
        let medium = Arc::clone(self.bus.medium());
        let Some(work) = medium.work() else {
            return;
        };
        let shutdown = self.bus.shutdown_token();
        let mut failures = 0u32;
        loop {
            // Biased: a stop or a shutdown wins over work that is ready at the same
            // moment (an unbiased select picks at random and could start another job).
            let jobs = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return,
                _ = shutdown.cancelled() => return,
                jobs = work.receive_work(&self.claim) => jobs,
            };
            match jobs {
                Ok(Some(mut jobs)) => {
                    failures = 0;
                    loop {
                        let job = tokio::select! {
                            biased;
                            _ = self.stop.cancelled() => return,
                            _ = shutdown.cancelled() => return,
                            job = jobs.next() => job,
                        };
                        match job {
                            Some(Ok(message)) => self.process(message).await,
                            Some(Err(error)) => {
                                tracing::warn!(%error, service = %self.claim.service, "work subscription failed");
                                break;
                            }
                            None => break,
                        }
                    }
                }
                Ok(None) => {
                    tracing::error!(
                        medium = medium.name(),
                        "the medium neither stores nor pushes work"
                    );
                    return;
                }
                Err(Error::Shutdown) => return,
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%error, service = %self.claim.service, "cannot subscribe to work");
                }
            }
            let pause = self.options.poll.saturating_mul(failures.clamp(1, 10));
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    async fn process(&self, message: Message) {
        let span = tracing::debug_span!("work", message_id = %message.id, action = %message.action, attempt = message.attempts);
        self.handle(message).instrument(span).await
    }

    async fn handle(&self, message: Message) {
        let Some(work) = self.bus.medium().work() else {
            return;
        };
        let owner = self.claim.owner.as_str();
        let id = message.id.clone();
        tracing::debug!(message_id = %id, attempt = message.attempts, "claimed");
        metrics::counter!(crate::metrics::CLAIMED, "service" => self.claim.service.clone())
            .increment(1);

        if self.policy == Policy::Requests {
            let deadline = message.query_ms.map(|ms| {
                message
                    .query_ts
                    .saturating_add(ms.saturating_mul(1_000_000))
            });
            if deadline.is_some_and(|d| d < now_nanos()) {
                let _ = work
                    .settle(
                        &id,
                        Some(owner),
                        Settlement::Failed(doc! { "error": "timed out before it was handled" }),
                    )
                    .await;
                return;
            }
        }
        if message.attempts > self.options.max_attempts {
            let reason = format!(
                "gave up after {} attempts: {}",
                message.attempts - 1,
                message
                    .last_error
                    .as_deref()
                    .unwrap_or("the worker holding it stopped")
            );
            self.bury(&id, &reason).await;
            return;
        }

        // The heartbeat lives in this future: if the worker dies, it stops renewing and
        // the lease runs out, so another worker takes the work (river PR #1256).
        let outcome = tokio::select! {
            outcome = run_handler(&self.handler, message.clone()) => outcome,
            never = self.hold_lease(&id) => never,
        };

        let settlement = match (outcome, self.policy) {
            (Ok(result), _) => Settlement::Done(result),
            (Err(error), Policy::Requests) => Settlement::Failed(doc! { "error": error }),
            (Err(error), Policy::Work) if message.attempts >= self.options.max_attempts => {
                let reason = format!("failed {} times, last: {error}", message.attempts);
                self.bury(&id, &reason).await;
                return;
            }
            (Err(error), Policy::Work) => {
                let after = self.options.pause_after(message.attempts);
                tracing::info!(message_id = %id, %error, retry_in_ms = after.as_millis() as u64, "work failed: will retry");
                metrics::counter!(crate::metrics::RETRIED, "service" => self.claim.service.clone())
                    .increment(1);
                Settlement::Retry { error, after }
            }
        };
        // Still holding the lease while settling: a settle that fails for a while (a
        // server stepping down, a lost connection) is tried again instead of letting the
        // lease run out and the finished work run a second time.
        tokio::select! {
            () = self.settle(&id, settlement) => {}
            () = self.hold_lease(&id) => {}
        }
    }

    /// Renews the lease every third of its length while the caller works; never
    /// returns (a lost lease stops the renewals and waits forever), so it only ends
    /// when the `select!` it races in does.
    async fn hold_lease<T>(&self, id: &str) -> T {
        let lease = self.options.lease;
        loop {
            tokio::time::sleep(lease / 3).await;
            let renewed = match self.bus.medium().work_or_unsupported() {
                Ok(work) => work.renew(id, &self.claim.owner, lease).await,
                Err(unsupported) => Err(unsupported),
            };
            match renewed {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(message_id = %id, "lease lost while the work is in hand");
                    return std::future::pending().await;
                }
                Err(error) => tracing::warn!(message_id = %id, %error, "lease not renewed"),
            }
        }
    }

    /// Settles held work, trying again while the medium is unavailable (retryable
    /// errors) and neither the worker nor the bus is stopping.
    async fn settle(&self, id: &str, settlement: Settlement) {
        let settled = match self.bus.medium().work_or_unsupported() {
            Ok(work) => {
                self.while_held(id, "not settled yet", || {
                    work.settle(id, Some(&self.claim.owner), settlement.clone())
                })
                .await
            }
            Err(unsupported) => Err(unsupported),
        };
        match settled {
            Ok(true) => tracing::debug!(message_id = %id, "settled"),
            Ok(false) => {
                tracing::warn!(message_id = %id, "lease lost before settling: another worker has it")
            }
            Err(error) => {
                tracing::warn!(message_id = %id, %error, "not settled: the lease will expire and the work come again")
            }
        }
    }

    async fn bury(&self, id: &str, reason: &str) {
        tracing::warn!(message_id = %id, %reason, "work moved to the dead letters");
        metrics::counter!(crate::metrics::DEAD_LETTERED, "reason" => "attempts").increment(1);
        let buried = match self.bus.medium().work_or_unsupported() {
            Ok(work) => {
                self.while_held(id, "not moved to the dead letters yet", || {
                    work.bury(id, &self.claim.owner, reason)
                })
                .await
            }
            Err(unsupported) => Err(unsupported),
        };
        if let Err(error) = buried {
            tracing::warn!(message_id = %id, %error, "not moved to the dead letters");
        }
    }

    /// Runs `op` (a settle or a bury) until it is done, trying again while its error is
    /// retryable and the worker and the bus run: the job stays held meanwhile (a lease
    /// on MongoDB, an unacknowledged delivery on MQTT), so nobody else takes it.
    async fn while_held<'a, F, Fut>(&self, id: &str, what: &str, mut op: F) -> Result<bool>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<bool>> + 'a,
    {
        let shutdown = self.bus.shutdown_token();
        let mut pause = crate::backoff::SETTLE.start();
        loop {
            match op().await {
                Err(error)
                    if error.is_retryable()
                        && !shutdown.is_cancelled()
                        && !self.stop.is_cancelled() =>
                {
                    tracing::warn!(message_id = %id, %error, retry_in_ms = pause.delay().as_millis() as u64, "{what}: trying again while the job is held");
                }
                done => return done,
            }
            tokio::select! {
                _ = self.stop.cancelled() => {}
                _ = pause.sleep(&shutdown) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let o = WorkOptions::default().backoff(Duration::from_millis(100));
        assert_eq!(o.pause_after(1), Duration::from_millis(100));
        assert_eq!(o.pause_after(2), Duration::from_millis(200));
        assert_eq!(o.pause_after(4), Duration::from_millis(800));
        assert_eq!(o.pause_after(40), Duration::from_secs(60));
    }

    #[test]
    fn work_options_per_action() {
        let c = crate::Config::from_sources(
            Some("common.intracom.work.invoice.render.lease_ms=5000\ncommon.intracom.work.invoice.render.max_attempts=3"),
            vec![("COMMON_INTRACOM_WORK_MAIL_SEND_BACKOFF_MS".to_string(), "250".to_string())],
        )
        .unwrap();
        let render = c.work["invoice.render"]
            .apply(WorkOptions::default().backoff(std::time::Duration::from_millis(7)));
        assert_eq!(render.lease, std::time::Duration::from_millis(5000));
        assert_eq!(render.max_attempts, 3);
        assert_eq!(
            render.backoff,
            std::time::Duration::from_millis(7),
            "what config does not set stays"
        );
        assert_eq!(
            c.work["mail.send"].backoff,
            Some(std::time::Duration::from_millis(250))
        );
        let e = crate::Config::from_properties("common.intracom.work.x.speed=1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("common.intracom.work.x.speed"), "{e}");
    }

    #[test]
    fn results_round_trip_documents_and_plain_values() {
        #[derive(Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Answer {
            n: i32,
        }
        assert_eq!(
            decode_result::<Answer>(encode_result(&Answer { n: 3 }).unwrap()).unwrap(),
            Answer { n: 3 }
        );
        assert_eq!(
            decode_result::<i64>(encode_result(&42i64).unwrap()).unwrap(),
            42
        );
        assert_eq!(
            decode_result::<String>(encode_result(&"x").unwrap()).unwrap(),
            "x"
        );
        decode_result::<()>(encode_result(&()).unwrap()).unwrap();
        assert!(decode_result::<Answer>(Some(doc! { "m": 1 })).is_err());
    }
}
