//! Trace context through the bus: the W3C trace context a message carries.
//!
//! Why it exists: a publish in one service and the handler that runs in another are
//! one operation to the people who run them. A message carries the publisher's W3C
//! trace context in its `trace` field (`{traceparent, tracestate}`, the values of the
//! W3C Trace Context headers), and the consumer runs its handler in a span whose parent
//! is that context, so that a tracing backend shows one trace from the publish to the
//! handler.
//!
//! - With the feature `otel`, [`crate::Intracom::publish`] stores the current span's
//!   context (from `tracing-opentelemetry`, or else OpenTelemetry's current context)
//!   in a message that has none, and [`process_span`] parents the handler's span on
//!   the message's context. [`crate::Subscriber::handle`], a worker's job
//!   ([`crate::Intracom::work`]) and a request's handler ([`crate::Intracom::serve`])
//!   run in that span.
//! - Without it, the field is still carried as it is: a message published by a service
//!   built with `otel` and read by one built without keeps its context (and no span is
//!   added around handlers).
//!
//! The gateway takes the `traceparent` and `tracestate` headers of an HTTP request into
//! the message it publishes, and shows `trace` in the messages of its event streams.

use serde::{Deserialize, Serialize};

use crate::message::Message;

/// Longest `tracestate` kept, in bytes: the W3C recommendation asks vendors to carry
/// at least 512 characters; a longer one is dropped (the `traceparent` is kept).
pub const MAX_TRACESTATE_LEN: usize = 512;

/// The W3C trace context of a message: the `trace` field, `{traceparent, tracestate}`.
///
/// ```
/// use intracom::trace::TraceContext;
/// let trace = TraceContext::new("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None)
///     .expect("a valid traceparent");
/// assert_eq!(trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert_eq!(trace.span_id(), "00f067aa0ba902b7");
/// assert!(TraceContext::new("not a traceparent", None).is_none());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "gateway", derive(utoipa::ToSchema))]
#[non_exhaustive]
pub struct TraceContext {
    /// The W3C `traceparent`: `<version>-<trace id>-<parent span id>-<flags>`, lowercase
    /// hex (`00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`).
    pub traceparent: String,
    /// The W3C `tracestate` (vendor entries, `key=value` separated by commas), when the
    /// publisher had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// A trace context from the two W3C header values: `None` when `traceparent` is not
    /// a valid one (the W3C rule: an invalid `traceparent` is ignored). A `tracestate`
    /// that is empty, longer than [`MAX_TRACESTATE_LEN`] or not printable ASCII is
    /// dropped, the `traceparent` kept.
    pub fn new(traceparent: impl Into<String>, tracestate: Option<String>) -> Option<Self> {
        let traceparent = traceparent.into();
        parse_traceparent(&traceparent)?;
        let tracestate = tracestate.filter(|state| valid_tracestate(state));
        Some(TraceContext {
            traceparent,
            tracestate,
        })
    }

    /// The trace id: 32 lowercase hex digits (empty if `traceparent` was written by hand
    /// and is not valid).
    pub fn trace_id(&self) -> &str {
        parse_traceparent(&self.traceparent).map_or("", |p| p.trace_id)
    }

    /// The parent span id: 16 lowercase hex digits (empty if `traceparent` is not
    /// valid).
    pub fn span_id(&self) -> &str {
        parse_traceparent(&self.traceparent).map_or("", |p| p.span_id)
    }

    /// The current span's context, if it has a valid one: the `tracing` span's
    /// OpenTelemetry context (`tracing-opentelemetry`), else OpenTelemetry's current
    /// context.
    #[cfg(feature = "otel")]
    #[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
    pub fn current() -> Option<Self> {
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let span = tracing::Span::current().context();
        let mut context = span.span().span_context().clone();
        if !context.is_valid() {
            context = opentelemetry::Context::current()
                .span()
                .span_context()
                .clone();
        }
        Self::of(&context)
    }

    /// The trace context of an OpenTelemetry span context (`None` if it is not valid).
    #[cfg(feature = "otel")]
    #[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
    pub fn of(context: &opentelemetry::trace::SpanContext) -> Option<Self> {
        if !context.is_valid() {
            return None;
        }
        let tracestate = context.trace_state().header();
        Some(TraceContext {
            traceparent: format!(
                "00-{}-{}-{:02x}",
                context.trace_id(),
                context.span_id(),
                context.trace_flags().to_u8()
            ),
            tracestate: (!tracestate.is_empty() && valid_tracestate(&tracestate))
                .then_some(tracestate),
        })
    }

    /// An OpenTelemetry context whose span is this remote one (the parent of a
    /// handler's span); `None` when `traceparent` is not valid.
    #[cfg(feature = "otel")]
    #[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
    pub fn to_context(&self) -> Option<opentelemetry::Context> {
        use opentelemetry::trace::{
            SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
        };
        let parsed = parse_traceparent(&self.traceparent)?;
        let trace_id = TraceId::from_hex(parsed.trace_id).ok()?;
        let span_id = SpanId::from_hex(parsed.span_id).ok()?;
        let state = self
            .tracestate
            .as_deref()
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        let context = SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::new(parsed.flags),
            true,
            state,
        );
        Some(opentelemetry::Context::new().with_remote_span_context(context))
    }
}

/// The parts of a valid `traceparent`.
struct Traceparent<'a> {
    trace_id: &'a str,
    span_id: &'a str,
    #[cfg_attr(not(feature = "otel"), allow(dead_code))]
    flags: u8,
}

fn lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parses a `traceparent` by the W3C rules: version `00` is exactly 55 characters; a
/// later version (not `ff`) may add fields after a `-`; the trace and span ids are
/// lowercase hex and not all zeros.
fn parse_traceparent(value: &str) -> Option<Traceparent<'_>> {
    if value.len() < 55 || !value.is_ascii() {
        return None;
    }
    let (version, trace_id, span_id, flags) =
        (&value[0..2], &value[3..35], &value[36..52], &value[53..55]);
    let dashes = [2, 35, 52].iter().all(|&i| value.as_bytes()[i] == b'-');
    let valid = dashes
        && lower_hex(version)
        && version != "ff"
        && lower_hex(trace_id)
        && lower_hex(span_id)
        && lower_hex(flags)
        && trace_id.bytes().any(|b| b != b'0')
        && span_id.bytes().any(|b| b != b'0')
        && match (version, value.len()) {
            (_, 55) => true,
            ("00", _) => false,
            (_, _) => value.as_bytes()[55] == b'-',
        };
    if !valid {
        return None;
    }
    Some(Traceparent {
        trace_id,
        span_id,
        flags: u8::from_str_radix(flags, 16).ok()?,
    })
}

fn valid_tracestate(value: &str) -> bool {
    !value.trim().is_empty()
        && value.len() <= MAX_TRACESTATE_LEN
        && value
            .bytes()
            .all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic())
}

/// The span a handler runs in for `message`, with the feature `otel`:
/// `intracom.process` (OpenTelemetry name `<action> process`, kind consumer, with the
/// message's id, action and sending service), whose parent is the message's trace
/// context when it carries a valid one (the current span otherwise). Without the
/// feature it is [`tracing::Span::none`]: a service that does not trace across
/// services sees no new span in its logs.
///
/// [`crate::Subscriber::handle`], workers and request handlers already run in it; a
/// consumer that reads a [`crate::Subscriber`] as a stream can do the same:
///
/// ```
/// # async fn consume(mut sub: intracom::Subscriber) -> intracom::Result<()> {
/// use futures::StreamExt;
/// use tracing::Instrument;
/// while let Some(delivery) = sub.next().await {
///     let delivery = delivery?;
///     let span = intracom::trace::process_span(&delivery);
///     async { /* handle the message */ }.instrument(span).await;
///     delivery.ack().await?;
/// }
/// # Ok(()) }
/// ```
pub fn process_span(message: &Message) -> tracing::Span {
    #[cfg(not(feature = "otel"))]
    {
        let _ = message;
        tracing::Span::none()
    }
    #[cfg(feature = "otel")]
    {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let span = tracing::info_span!(
            "intracom.process",
            otel.name = %format_args!("{} process", message.action),
            otel.kind = "consumer",
            messaging.system = "intracom",
            messaging.operation.type = "process",
            messaging.destination.name = %message.action,
            messaging.message.id = %message.id,
            intracom.source = %message.source_service,
        );
        if let Some(parent) = message.trace.as_ref().and_then(TraceContext::to_context) {
            // Without the OpenTelemetry layer there is nothing to parent.
            let _ = span.set_parent(parent);
        }
        span
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparents_are_parsed_by_the_w3c_rules() {
        let parsed = parse_traceparent(VALID).expect("valid");
        assert_eq!(parsed.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parsed.span_id, "00f067aa0ba902b7");
        assert_eq!(parsed.flags, 1);
        // A later version may add fields after a dash.
        assert!(parse_traceparent(&format!("01{}-later", &VALID[2..])).is_some());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?}");
            assert!(TraceContext::new(bad, None).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn a_bad_tracestate_is_dropped_and_the_traceparent_kept() {
        let kept = TraceContext::new(VALID, Some("vendor=abc,other=1".into())).unwrap();
        assert_eq!(kept.tracestate.as_deref(), Some("vendor=abc,other=1"));
        for bad in ["", "  ", "a=\u{e9}", &"a".repeat(MAX_TRACESTATE_LEN + 1)] {
            let trace = TraceContext::new(VALID, Some(bad.to_string())).unwrap();
            assert_eq!(trace.tracestate, None, "{bad:?}");
            assert_eq!(trace.traceparent, VALID);
        }
    }

    #[test]
    fn the_field_reads_as_two_strings() {
        let mut message = Message::broadcast("reload");
        message.trace = TraceContext::new(VALID, Some("v=1".into()));
        let document = bson::to_document(&message).unwrap();
        assert_eq!(
            document.get_document("trace").unwrap(),
            &bson::doc! { "traceparent": VALID, "tracestate": "v=1" }
        );
        let back: Message = bson::from_document(document).unwrap();
        assert_eq!(back, message);
        let plain = bson::to_document(&Message::broadcast("reload")).unwrap();
        assert!(!plain.contains_key("trace"));
    }

    #[cfg(feature = "otel")]
    #[test]
    fn a_context_round_trips_through_the_field() {
        use opentelemetry::trace::TraceContextExt;
        let trace = TraceContext::new(VALID, Some("vendor=abc".into())).unwrap();
        let context = trace.to_context().expect("valid");
        let span = context.span();
        let span_context = span.span_context();
        assert!(span_context.is_remote());
        assert_eq!(TraceContext::of(span_context), Some(trace));
    }
}
