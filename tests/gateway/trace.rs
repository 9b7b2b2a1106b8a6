//! Trace context through the gateway: the W3C `traceparent` and `tracestate` headers
//! of an HTTP request go into the message it publishes, its SSE event shows them in
//! `trace`, and (feature `otel`) the subscriber's handler in another service is in the
//! caller's trace: from a real `curl` process.

use libtest_mimic::Trial;
use reqwest::StatusCode;
use serde_json::{json, Value};

use super::{block_on, Gw, Place, BILLING, GUARD, USERS};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SPAN_ID: &str = "00f067aa0ba902b7";

fn traceparent() -> String {
    format!("00-{TRACE_ID}-{SPAN_ID}-01")
}

/// The trials of this file.
pub fn trials() -> Vec<Trial> {
    #[allow(unused_mut)] // pushed to with the feature `otel`
    let mut trials = vec![Trial::test(
        "memory::trace_headers_reach_the_message_and_its_sse_event",
        || block_on(trace_headers_reach_the_message_and_its_sse_event()),
    )];
    #[cfg(feature = "otel")]
    {
        let trial = Trial::test(
            "memory::one_trace_from_curl_to_a_subscribers_handler",
            || {
                let traced = std::sync::Arc::new(otel::Traced::new());
                traced.block_on(one_trace_from_curl_to_a_subscribers_handler(traced.clone()));
                Ok(())
            },
        );
        trials.push(match curl() {
            Ok(_) => trial,
            Err(reason) => trial.with_ignored_flag(true).with_kind(reason),
        });
    }
    trials
}

/// The HTTP clients of these tests use rustls; with the feature `http` reqwest is built
/// without a crypto provider of its own: the one the gateway uses (ring) is installed
/// for the process, unless one is already.
fn crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// POST `body` to `path` with the trace headers given; the status and the JSON answer.
async fn post_traced(
    gw: &Gw,
    path: &str,
    token: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> (StatusCode, Value) {
    let mut request = gw.http.post(gw.url(path)).bearer_auth(token).json(&body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = tokio::time::timeout(GUARD, request.send())
        .await
        .expect("hang guard")
        .expect("an answer");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn trace_headers_reach_the_message_and_its_sse_event() {
    crypto_provider();
    let gw = Gw::start(&Place::Memory).await;
    let mut events = gw.subscribe("/subscribe/reload", BILLING, None).await;
    let traceparent = traceparent();
    type Headers<'a> = &'a [(&'a str, &'a str)];
    let cases: [(Headers, Option<Value>); 4] = [
        (
            &[("traceparent", &traceparent), ("tracestate", "vendor=abc")],
            Some(json!({ "traceparent": traceparent, "tracestate": "vendor=abc" })),
        ),
        (
            &[("traceparent", &traceparent)],
            Some(json!({ "traceparent": traceparent })),
        ),
        // An invalid traceparent is ignored (the W3C rule), with its tracestate.
        (
            &[
                ("traceparent", "00-not-a-trace-01"),
                ("tracestate", "vendor=abc"),
            ],
            None,
        ),
        (&[], None),
    ];
    for (headers, expected) in cases {
        let (status, receipt) = post_traced(
            &gw,
            "/publish",
            USERS,
            headers,
            json!({ "action": "reload", "to": "billing" }),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{receipt}");
        let (_, message) = events.message("the published message").await;
        assert_eq!(message["id"], receipt["id"]);
        assert_eq!(
            message.get("trace").cloned(),
            expected,
            "headers {headers:?}"
        );
    }
    gw.stop().await;
}

#[cfg(feature = "otel")]
#[path = "../support/otel.rs"]
mod otel;

/// The machine's curl, or why there is none.
#[cfg(feature = "otel")]
fn curl() -> Result<std::path::PathBuf, String> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("curl"))
        .find(|path| path.is_file())
        .ok_or_else(|| "no curl on the PATH".to_string())
}

/// Runs curl with `args`; its stdout, after checking it succeeded.
#[cfg(feature = "otel")]
async fn run_curl(args: Vec<String>) -> String {
    let curl = curl().expect("curl");
    let output = tokio::time::timeout(
        GUARD,
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(curl)
                .args(&args)
                .stdin(std::process::Stdio::null())
                .output()
        }),
    )
    .await
    .expect("curl: hang guard")
    .expect("curl's task")
    .expect("curl runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "curl: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[cfg(feature = "otel")]
async fn one_trace_from_curl_to_a_subscribers_handler(traced: std::sync::Arc<otel::Traced>) {
    use intracom::bson::{doc, Document};
    use intracom::{Message, Subscription};
    use opentelemetry::trace::{SpanId, TraceId};

    crypto_provider();
    let gw = Gw::start(&Place::Memory).await;
    // The subscriber: another service, on another bus.
    let billing = gw.peer("billing").await;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(TraceId, Message)>();
    let sub = billing
        .subscribe(Subscription::named("billing-reloads").actions(["reload"]))
        .await
        .expect("subscribe");
    let handling = tokio::spawn(sub.handle(move |message: Message| {
        let seen_tx = seen_tx.clone();
        async move {
            let _ = seen_tx.send((otel::current_trace(), message));
            Ok::<(), std::convert::Infallible>(())
        }
    }));
    let server = billing
        .serve("billing", "invoice.get", |_: Document| async move {
            Ok::<_, std::convert::Infallible>(doc! { "trace": otel::current_trace().to_string() })
        })
        .expect("serve");
    let trace = TraceId::from_hex(TRACE_ID).expect("a trace id");
    let parent = SpanId::from_hex(SPAN_ID).expect("a span id");
    let headers = |path: &str, body: &str| -> Vec<String> {
        [
            "--silent",
            "--show-error",
            "--fail-with-body",
            "--request",
            "POST",
            "--header",
            &format!("Authorization: Bearer {USERS}"),
            "--header",
            "Content-Type: application/json",
            "--header",
            &format!("traceparent: {}", traceparent()),
            "--header",
            "tracestate: vendor=curl",
            "--data",
            body,
            &gw.url(path),
        ]
        .map(str::to_string)
        .to_vec()
    };

    // A publish to a subscriber's handler.
    let receipt: Value = serde_json::from_str(
        &run_curl(headers(
            "/publish",
            r#"{"action": "reload", "to": "billing"}"#,
        ))
        .await,
    )
    .expect("a JSON receipt");
    let (seen, message) = tokio::time::timeout(GUARD, seen_rx.recv())
        .await
        .expect("the delivery: hang guard")
        .expect("a delivery");
    assert_eq!(json!(message.id), receipt["id"]);
    let stored = message.trace.as_ref().expect("the message carries a trace");
    assert_eq!(stored.traceparent, traceparent());
    assert_eq!(stored.tracestate.as_deref(), Some("vendor=curl"));
    assert_eq!(seen, trace, "the handler runs in curl's trace");
    let span = traced.span(&otel::process("reload"), trace).await;
    assert_eq!(
        span.parent_span_id, parent,
        "the handler's span is curl's span's child"
    );
    assert!(span.parent_span_is_remote);

    // A request to a handler.
    let answer: Value =
        serde_json::from_str(&run_curl(headers("/request/billing/invoice.get", "{}")).await)
            .expect("a JSON answer");
    assert_eq!(answer["result"]["trace"], json!(TRACE_ID), "{answer}");
    let span = traced.span(&otel::process("invoice.get"), trace).await;
    assert_eq!(
        span.parent_span_id, parent,
        "the handler's span is curl's span's child"
    );

    server.stop().await;
    billing.shutdown().await;
    gw.stop().await;
    let _ = tokio::time::timeout(GUARD, handling).await;
}
