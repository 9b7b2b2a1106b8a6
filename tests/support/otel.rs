//! One trace across services (feature `otel`): the spans of a test are exported to
//! memory by the OpenTelemetry SDK (`InMemorySpanExporter`, through
//! `tracing-opentelemetry`'s layer), and the checks read their trace ids and parents.
//!
//! Each test runs on a runtime of its own whose every thread reports to the test's own
//! subscriber (a thread default, not the process's global one), so that the trials that
//! run at the same time do not see each other's spans.
#![allow(dead_code)]

use std::future::{Future, IntoFuture};
use std::time::Duration;

use intracom::bson::{doc, Document};
use intracom::{Config, Intracom, Message, Subscription, WorkOptions};
use opentelemetry::trace::{SpanId, TraceContextExt, TraceId, TracerProvider};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

/// The hang guard of every wait here (a failure, never a timing assertion).
pub const GUARD: Duration = Duration::from_secs(60);

/// A test's tracing: its subscriber and the spans it exported.
pub struct Traced {
    exporter: InMemorySpanExporter,
    _provider: SdkTracerProvider,
    dispatch: tracing::Dispatch,
}

impl Default for Traced {
    fn default() -> Self {
        Self::new()
    }
}

impl Traced {
    /// A subscriber with the OpenTelemetry layer, exporting each span as it ends.
    pub fn new() -> Self {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let tracer = provider.tracer("intracom-tests");
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(tracer));
        Traced {
            exporter,
            _provider: provider,
            dispatch: tracing::Dispatch::new(subscriber),
        }
    }

    /// Runs `body` on a runtime of its own whose threads all report to this subscriber.
    /// Call it from a plain thread (not inside a runtime): see [`Traced::run`].
    pub fn block_on<F: Future>(&self, body: F) -> F::Output {
        let dispatch = self.dispatch.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(move || {
                // Kept for the thread's life: every span of the runtime is this test's.
                std::mem::forget(tracing::dispatcher::set_default(&dispatch));
            })
            .build()
            .expect("a runtime");
        let _default = tracing::dispatcher::set_default(&self.dispatch);
        let output = runtime.block_on(body);
        runtime.shutdown_timeout(Duration::from_secs(5));
        output
    }

    /// Runs `test` with a new [`Traced`] on a thread and runtime of its own, from inside
    /// another runtime (a harness whose checks are async); a panic is the test's.
    pub async fn run<F, Fut>(test: F)
    where
        F: FnOnce(std::sync::Arc<Traced>) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let joined = std::thread::spawn(move || {
            let traced = std::sync::Arc::new(Traced::new());
            traced.block_on(test(traced.clone()))
        })
        .join();
        if let Err(panic) = joined {
            std::panic::resume_unwind(panic);
        }
    }

    /// The spans that ended so far.
    pub fn spans(&self) -> Vec<SpanData> {
        self.exporter
            .get_finished_spans()
            .expect("the exported spans")
    }

    /// Waits for the ended span named `name` whose trace is `trace`.
    pub async fn span(&self, name: &str, trace: TraceId) -> SpanData {
        let deadline = tokio::time::Instant::now() + GUARD;
        loop {
            if let Some(span) = self
                .spans()
                .into_iter()
                .find(|s| s.name == name && s.span_context.trace_id() == trace)
            {
                return span;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no span `{name}` in trace {trace} within the hang guard; spans: {:?}",
                self.spans()
                    .iter()
                    .map(|s| (s.name.to_string(), s.span_context.trace_id()))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The ids of `span`'s ancestors among the ended spans, nearest first.
    pub fn ancestors(&self, span: &SpanData) -> Vec<SpanId> {
        let spans = self.spans();
        let mut out = vec![span.parent_span_id];
        while let Some(parent) = spans
            .iter()
            .find(|s| Some(&s.span_context.span_id()) == out.last())
        {
            out.push(parent.parent_span_id);
        }
        out
    }
}

/// The trace and span id of a `tracing` span's OpenTelemetry context.
pub fn ids(span: &tracing::Span) -> (TraceId, SpanId) {
    let context = span.context();
    let span_ref = context.span();
    let context = span_ref.span_context();
    assert!(context.is_valid(), "the span has an OpenTelemetry context");
    (context.trace_id(), context.span_id())
}

/// The trace id of the current span, as the code in a handler sees it.
pub fn current_trace() -> TraceId {
    ids(&tracing::Span::current()).0
}

/// The catalog of the trace tests: `billing` serves, `users` publishes.
pub fn catalog(service: &str) -> Config {
    Config::builder()
        .service(service)
        .sender(
            "billing",
            ["invoice.created", "invoice.render", "invoice.get"],
        )
        .sender("users", Vec::<String>::new())
        .build()
        .expect("config")
}

/// The handler's span of a message for `action` (`otel.name`).
pub fn process(action: &str) -> String {
    format!("{action} process")
}

/// One trace from a publish in `users` to the handler in `billing`, two buses with
/// their own service names on one medium (`users` and `billing` made by the caller from
/// [`catalog`]): a delivery to a subscriber, a worker's job, a request's handler.
pub async fn one_trace_across_services(traced: &Traced, users: Intracom, billing: Intracom) {
    // A delivery to a subscriber's handler.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(TraceId, Message)>();
    let sub = billing
        .subscribe(Subscription::named("billing-invoices").actions(["invoice.created"]))
        .await
        .expect("subscribe");
    let tx = seen_tx.clone();
    let handling = tokio::spawn(sub.handle(move |message: Message| {
        let tx = tx.clone();
        async move {
            let _ = tx.send((current_trace(), message));
            Ok::<(), std::convert::Infallible>(())
        }
    }));
    let checkout = tracing::info_span!("checkout");
    let (trace, parent) = ids(&checkout);
    users
        .publish(Message::to_service("billing", "invoice.created").body(doc! { "invoice": 1 }))
        .instrument(checkout.clone())
        .await
        .expect("publish");
    drop(checkout);
    let (seen, message) = tokio::time::timeout(GUARD, seen_rx.recv())
        .await
        .expect("the delivery: hang guard")
        .expect("a delivery");
    let stored = message.trace.as_ref().expect("the message carries a trace");
    assert_eq!(stored.trace_id(), trace.to_string());
    assert_eq!(stored.span_id(), parent.to_string());
    assert_eq!(seen, trace, "the handler runs in the publisher's trace");
    let span = traced.span(&process("invoice.created"), trace).await;
    assert_eq!(
        span.parent_span_id, parent,
        "the delivery's span is the publish's child"
    );
    assert!(span.parent_span_is_remote);

    // A worker's job.
    let tx = seen_tx.clone();
    let worker = billing
        .work(
            "billing",
            &["invoice.render"],
            WorkOptions::default(),
            move |message: Message| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send((current_trace(), message));
                    Ok::<(), std::convert::Infallible>(())
                }
            },
        )
        .expect("worker");
    let enqueue = tracing::info_span!("enqueue");
    let (trace, parent) = ids(&enqueue);
    // A medium that sends work to a present worker only (MQTT) refuses it until the
    // worker's presence is known: publish again until it is taken.
    let deadline = tokio::time::Instant::now() + GUARD;
    while let Err(error) = users
        .publish(Message::to_service("billing", "invoice.render").work())
        .instrument(enqueue.clone())
        .await
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "publish work: {error}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(enqueue);
    let (seen, message) = tokio::time::timeout(GUARD, seen_rx.recv())
        .await
        .expect("the job: hang guard")
        .expect("a job");
    assert_eq!(message.action, "invoice.render");
    assert_eq!(seen, trace, "the job runs in the publisher's trace");
    let span = traced.span(&process("invoice.render"), trace).await;
    assert_eq!(
        span.parent_span_id, parent,
        "the job's span is the publish's child"
    );

    // A request's handler.
    let server = billing
        .serve("billing", "invoice.get", |query: Document| async move {
            Ok::<_, std::convert::Infallible>(doc! { "invoice": query.get_i32("invoice").unwrap_or(0), "trace": current_trace().to_string() })
        })
        .expect("serve");
    let ask = tracing::info_span!("ask");
    let (trace, parent) = ids(&ask);
    let answer: Document = users
        .request("billing", "invoice.get", &doc! { "invoice": 7 })
        .timeout(GUARD)
        .into_future()
        .instrument(ask.clone())
        .await
        .expect("the answer");
    drop(ask);
    assert_eq!(answer.get_i32("invoice").ok(), Some(7));
    assert_eq!(
        answer.get_str("trace").ok(),
        Some(trace.to_string().as_str()),
        "the request's handler runs in the caller's trace"
    );
    let span = traced.span(&process("invoice.get"), trace).await;
    assert!(
        traced.ancestors(&span).contains(&parent),
        "the request's handler descends from the caller's span"
    );

    worker.stop().await;
    server.stop().await;
    users.shutdown().await;
    billing.shutdown().await;
    let _ = tokio::time::timeout(GUARD, handling).await;
}
